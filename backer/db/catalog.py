"""backer's own SQLite tables: derived indexes over the journal plus local caches.

Everything here except ``local`` and the chunk locations can be rebuilt by replaying
the journal; they exist so that questions like "what is live at this path" or "what
was this path before" are one indexed lookup instead of a walk of the CRDT.

- ``live``: the live versions per path (the CRDT's present keys).
- ``versions``: every version ever seen, with author and journal position (history).
- ``local``: what the disk held at the last scan — (size, mtime_ns, inode, mode) and
  the version it matched — so unchanged files are recognised without rehashing.
- ``manifests``: chunk lists by content id; ``chunks``: where a chunk's bytes can be
  read locally (verified by hash when read, so a stale row is harmless).
- ``members``: devices admitted to the share (``kept`` set once removed: how many of its
  events stay valid); ``renames``: the names each device gave itself; ``invites``:
  invites seen, with the signed event that made each; ``meta``: share id, share keys,
  positions.
- ``addresses``: where each device may be reached, whence it was learned, when last seen
  and last connected to; ``announcements``: the newest signed announcement of each
  device's listen addresses, to pass on (both local knowledge, never in the journal).
"""

from __future__ import annotations

import contextlib
import sqlite3
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import sqlite_utils

from backer.model import entropy
from backer.model.records import Kind, Version, record_size, record_supersedes, split_key
from backer.model.state import Delta
from backer.scanner.content import Manifest

EMPTY_MANIFEST = Manifest(())
_MEMBER_NAME = (  # a member's name: its last rename, else the name it was admitted with
    "COALESCE((SELECT r.name FROM renames r WHERE r.key = members.key "
    "ORDER BY r.seq DESC LIMIT 1), members.name)"
)


class LocalEntry(NamedTuple):
    """What the scanner last saw on disk at a path, and the version it recorded."""

    path: str
    version_id: str
    size: int
    mtime_ns: int
    inode: int
    mode: int
    settled: bool  # False: the mtime was too recent to trust, so rehash at the next scan

    @property
    def stat_key(self) -> tuple[int, int, int, int]:
        return self.size, self.mtime_ns, self.inode, self.mode


class Problem(NamedTuple):
    """Why one path could not be recorded or applied (or, ``warning``, what the person
    should know about it although it is synced)."""

    path: str
    reason: str
    warning: bool = False


@dataclass(frozen=True)
class HistoryEntry:
    version_id: str
    version: Version
    author: bytes
    position: int
    live: bool


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


PAGE_CACHE_KIB = 8 * 1024  # SQLite's page cache per connection: the journal asks 64 MiB
# for its bulk ingest, which a 100,000-file share's ~100 MB database then fills on each
# side of a first sync (RSS); reads that miss it are served by the kernel's page cache
MANIFEST_CACHE = 8_192  # a window (5,000 files) looks each manifest up several times
LARGE_VALUE_PIECE = 1024 * 1024  # see Catalog.set_meta_large


def rows_where_in(
    conn: sqlite3.Connection, select: str, column: str, values: list[Any]
) -> Iterator[tuple[Any, ...]]:
    """The rows of ``select`` whose ``column`` is one of ``values``: one query per 500
    values (SQLite's limit on parameters, and one query rather than one per value)."""
    for start in range(0, len(values), 500):
        part = values[start : start + 500]
        yield from conn.execute(f"{select} WHERE {column} IN ({','.join('?' * len(part))})", part)


@contextlib.contextmanager
def one_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """Statements in one commit, schema changes too: Python's sqlite3 opens no
    transaction before a CREATE or an ALTER, so each was a commit of its own (a new
    share's schema took ~90 fdatasyncs before it held anything)."""
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN")
    try:
        yield
    except BaseException:
        conn.rollback()
        raise
    conn.commit()


def scratch_in_memory(conn: sqlite3.Connection) -> None:
    """Keep SQLite's scratch (statement journals past 64 KiB, sorts past the page cache,
    transient indices) in memory, not in TMPDIR or /tmp: a full system temp directory
    failed a scan or an ingest with 'database or disk is full' while the share's disk had
    room (R46; docs/decisions.md says what bounds it)."""
    conn.execute("PRAGMA temp_store=MEMORY")


def read_local(
    conn: sqlite3.Connection, paths: Iterable[str] | None = None, subtrees: Iterable[str] = ()
) -> dict[str, LocalEntry]:
    """Scan-cache rows: all of them (``paths`` None and no ``subtrees``), or those of
    ``paths`` and of everything below each of ``subtrees``. A function of the connection,
    so that a scan in a worker thread can read through a connection of its own."""
    select = "SELECT path, vid, size, mtime_ns, inode, mode, settled FROM local"
    make = LocalEntry._make
    subtrees = list(subtrees)
    if paths is None and not subtrees:
        return {row[0]: make(row) for row in conn.execute(select)}
    found = {row[0]: make(row) for row in rows_where_in(conn, select, "path", list(paths or ()))}
    for top in subtrees:  # 'a/' < every 'a/...' < 'a0' ('0' follows '/')
        rows = conn.execute(f"{select} WHERE path > ? AND path < ?", (top + "/", top + "0"))
        found.update((row[0], make(row)) for row in rows)
    return found


def read_local_names(conn: sqlite3.Connection, inodes: list[int]) -> list[str]:
    """The scan-cache paths recorded with one of ``inodes``: the other names of a
    hard-linked file (index ``local_inode``)."""
    return [row[0] for row in rows_where_in(conn, "SELECT path FROM local", "inode", inodes)]


def read_local_after(conn: sqlite3.Connection, after: str, limit: int) -> list[LocalEntry]:
    """At most ``limit`` scan-cache rows after the path ``after``, in path order: a whole
    scan reads the cache a page at a time beside its walk instead of all of it at once."""
    rows = conn.execute(
        "SELECT path, vid, size, mtime_ns, inode, mode, settled FROM local "
        "WHERE path > ? ORDER BY path LIMIT ?",
        (after, limit),
    )
    return [LocalEntry._make(row) for row in rows]


# A path's parent directory with its '/' ("" at the top), from SQLite's own functions:
# rtrim strips from the right every character that is not a '/'. An index on it lists
# one folder without reading the share (and needs no function of ours to maintain it).
PARENT = "rtrim(path, replace(path, '/', ''))"


class Catalog:
    def __init__(self, db: sqlite_utils.Database, migrate: bool = True) -> None:
        """``migrate`` False: a reader's connection of its own (read only), for which
        the share's own connection has brought the schema up to date."""
        self.db = db
        self.conn: sqlite3.Connection = db.conn
        self._manifests: dict[bytes, Manifest] = {}  # content-addressed, so never stale
        self.conn.execute(f"PRAGMA cache_size=-{PAGE_CACHE_KIB}")
        scratch_in_memory(self.conn)
        self.conn.create_function("nfc", 1, _nfc, deterministic=True)
        self.conn.create_function("record_size", 1, record_size, deterministic=True)
        if not migrate:
            return
        with one_transaction(self.conn):
            self._migrate()

    def _migrate(self) -> None:
        """Bring the schema up to date: every table, column and index of this version."""
        if "live" not in self.db.table_names():
            self._create_schema()
        self.conn.execute(  # added later than the rest: older shares get it on open
            "CREATE TABLE IF NOT EXISTS problems (path TEXT, source TEXT, reason TEXT, "
            "warning INTEGER, since_ms INTEGER, PRIMARY KEY (path, source)) WITHOUT ROWID"
        )
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS forgotten (path TEXT PRIMARY KEY, vid TEXT) WITHOUT ROWID"
        )
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS addresses (device BLOB, host TEXT, port INTEGER, "
            "source TEXT, seen_ms INTEGER, success_ms INTEGER, PRIMARY KEY (device, host, port)) "
            "WITHOUT ROWID"
        )
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS announcements (device BLOB PRIMARY KEY, time_ms INTEGER, "
            "raw BLOB) WITHOUT ROWID"
        )
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS renames (key BLOB, seq INTEGER, name TEXT, "
            "PRIMARY KEY (key, seq)) WITHOUT ROWID"
        )
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS unheld (content BLOB, device BLOB, ms INTEGER, "
            "PRIMARY KEY (content, device)) WITHOUT ROWID"
        )
        self._add_columns()
        self._add_indexes()

    def _add_indexes(self) -> None:
        """Indexes added since a share was made (built once, on the first open): one
        folder's entries, one event's versions in path order, one path's chunk rows
        (moving a replaced file's rows to its store entry scanned them all, per file),
        and the names of one inode (every recorded file has a second link, the store's,
        so an edited file's other names are looked up by inode, not by link count)."""
        self.conn.execute("CREATE INDEX IF NOT EXISTS local_inode ON local (inode)")
        self.conn.execute(f"CREATE INDEX IF NOT EXISTS live_parent ON live ({PARENT}, path)")
        self.conn.execute(
            "CREATE INDEX IF NOT EXISTS versions_position ON versions (position, path, vid)"
        )
        self.conn.execute("CREATE INDEX IF NOT EXISTS chunks_path ON chunks (path)")

    def _add_columns(self) -> None:
        """Columns added since a share was made (a share made by an older backer)."""
        for table, column in (
            ("members", "added_seq"),
            ("members", "kept"),
            ("members", "removed_by"),
            ("members", "removed_seq"),
            ("invites", "raw"),
            ("supersedes", "recorded_ms"),
            ("versions", "recorded_ms"),
        ):
            names = [row[1] for row in self.conn.execute(f"PRAGMA table_info({table})")]
            if column not in names:
                self.conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")

    def _create_schema(self) -> None:
        for statement in (
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB)",
            "CREATE TABLE live (path TEXT, vid TEXT, record BLOB, "
            "PRIMARY KEY (path, vid)) WITHOUT ROWID",
            "CREATE TABLE versions (vid TEXT PRIMARY KEY, path TEXT, record BLOB, "
            "author BLOB, position INTEGER, recorded_ms INTEGER)",
            "CREATE INDEX versions_path ON versions (path, position)",
            "CREATE TABLE local (path TEXT PRIMARY KEY, vid TEXT, size INTEGER, "
            "mtime_ns INTEGER, inode INTEGER, mode INTEGER, settled INTEGER) WITHOUT ROWID",
            "CREATE TABLE manifests (id BLOB PRIMARY KEY, body BLOB) WITHOUT ROWID",
            "CREATE TABLE chunks (hash BLOB, path TEXT, offset INTEGER, "
            "length INTEGER, PRIMARY KEY (hash, path)) WITHOUT ROWID",
            "CREATE TABLE supersedes (old TEXT, new TEXT, recorded_ms INTEGER, "
            "PRIMARY KEY (old, new)) WITHOUT ROWID",
            "CREATE TABLE members (key BLOB PRIMARY KEY, name TEXT, added_by BLOB, "
            "added_seq INTEGER, kept INTEGER, removed_by BLOB, removed_seq INTEGER)",
            "CREATE TABLE invites (id BLOB PRIMARY KEY, psk BLOB, expires_ms INTEGER, "
            "used_by BLOB, raw BLOB)",
        ):
            self.conn.execute(statement)

    # -- meta ------------------------------------------------------------------------

    def get_meta(self, key: str, default: bytes | None = None) -> bytes | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: bytes | str | int) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def set_meta_large(self, key: str, value: bytes) -> None:
        """:meth:`set_meta` of a value of megabytes (the document's snapshot), written
        into its row a MiB at a time: bound as a parameter, SQLite took a copy of the
        whole value and its pages stayed in the process (+10 MiB at the end of a first
        sync of 100,000 files, the join's peak)."""
        self.conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, zeroblob(?))", (key, len(value))
        )
        (row,) = self.conn.execute("SELECT rowid FROM meta WHERE key = ?", (key,)).fetchone()
        view = memoryview(value)
        with self.conn.blobopen("meta", "value", row) as blob:
            for start in range(0, len(value), LARGE_VALUE_PIECE):
                blob.write(view[start : start + LARGE_VALUE_PIECE])

    def get_int(self, key: str) -> int:
        value = self.get_meta(key)
        return int(value) if value is not None else 0

    # -- replicated state ------------------------------------------------------------

    def apply_delta(self, delta: Delta, author: bytes, position: int) -> None:
        """Record what one journal event changed in the live set and in history. A
        version that a known version supersedes is never live: two devices may record
        the same version id (a conflict copy's is the same everywhere), and the CRDT
        keeps the one added concurrently with the other's removal, on every device,
        whichever of the two arrives first; the superseding version may be at another
        path (a conflict copy supersedes, at the copy's name, the version it carries).
        Each version and supersession notes when this device learned of it, by its own
        clock: retention cannot take the author's word for it (a clock reset to the past
        would make a version replaced now look replaced years ago)."""
        recorded_ms = entropy.now_ms()
        added = [(*split_key(key), record) for key, record in delta.added.items()]
        self.conn.executemany(
            "INSERT OR IGNORE INTO versions (path, vid, record, author, position, recorded_ms) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            sorted(
                (
                    (path, vid, record, author, position, recorded_ms)
                    for path, vid, record in added
                ),
                key=lambda row: row[1],  # by primary key: sorted inserts are much faster
            ),
        )
        superseding = [
            (path, vid, old) for path, vid, record in added for old in record_supersedes(record)
        ]
        self.conn.executemany(
            "INSERT OR IGNORE INTO supersedes (old, new, recorded_ms) VALUES (?, ?, ?)",
            [(old, vid, recorded_ms) for _, vid, old in superseding],
        )
        self.conn.executemany(
            "INSERT OR REPLACE INTO live (path, vid, record) SELECT ?, ?, ? "
            "WHERE NOT EXISTS (SELECT 1 FROM supersedes WHERE old = ?)",
            [(path, vid, record, vid) for path, vid, record in added],
        )
        self.conn.executemany(
            "DELETE FROM live WHERE path = ? AND vid = ?", [split_key(key) for key in delta.removed]
        )
        self.conn.executemany(  # (each where it is, not at the superseding version's path)
            "DELETE FROM live WHERE vid = ? AND path = (SELECT path FROM versions WHERE vid = ?)",
            [(old, old) for _, _, old in superseding],
        )

    def recorded(self, version_ids: list[str]) -> dict[str, tuple[str, bytes]]:
        """(path, record) of each of ``version_ids`` already in history: one query per
        500 ids (a first sync checks 100,000s, one event of ~1,000 at a time)."""
        select = "SELECT vid, path, record FROM versions"
        rows = rows_where_in(self.conn, select, "vid", version_ids)
        return {vid: (path, record) for vid, path, record in rows}

    def live_for(self, paths: list[str]) -> dict[str, dict[str, Version]]:
        """Live versions of many paths at once (one query per few hundred paths)."""
        found: dict[str, dict[str, Version]] = {}
        for start in range(0, len(paths), 500):
            some = paths[start : start + 500]
            rows = self.conn.execute(
                f"SELECT path, vid, record FROM live WHERE path IN ({','.join('?' * len(some))})",
                some,
            )
            for path, vid, record in rows:
                found.setdefault(path, {})[vid] = Version.decode(record)
        return found

    def superseded_by_other_than(self, old: str, new: str) -> bool:
        """Whether a version other than ``new`` names ``old`` as superseded."""
        row = self.conn.execute(
            "SELECT 1 FROM supersedes WHERE old = ? AND new != ? LIMIT 1", (old, new)
        ).fetchone()
        return row is not None

    def conflicted_paths(self) -> list[str]:
        rows = self.conn.execute(
            "SELECT path FROM live GROUP BY path HAVING count(*) > 1 ORDER BY path"
        )
        return [path for (path,) in rows]

    def live_versions(self, path: str) -> dict[str, Version]:
        rows = self.conn.execute("SELECT vid, record FROM live WHERE path = ?", (path,))
        return {vid: Version.decode(record) for vid, record in rows}

    def all_live(self) -> Iterator[tuple[str, str, Version]]:
        rows = self.conn.execute("SELECT path, vid, record FROM live ORDER BY path, vid")
        for path, vid, record in rows:
            yield path, vid, Version.decode(record)

    def live_under(self, directory: str) -> Iterator[tuple[str, str, Version]]:
        """The live versions of every path below ``directory`` ("": the whole share)."""
        if not directory:
            yield from self.all_live()
            return
        rows = self.conn.execute(
            "SELECT path, vid, record FROM live WHERE path > ? AND path < ? ORDER BY path, vid",
            (directory + "/", directory + "0"),  # ("0" sorts right after "/")
        )
        for path, vid, record in rows:
            yield path, vid, Version.decode(record)

    def live_not_on_disk(self) -> Iterator[tuple[str, str, bytes]]:
        """The live versions (path, id, record) the scan cache does not name at their
        path (what a plan may have to write or delete), in path order. Compared inside
        SQLite, so that a plan decodes the few versions that differ, not every version of
        the share; records stay encoded for the plan to keep as they are."""
        return self.conn.execute(
            "SELECT live.path, live.vid, live.record FROM live "
            "LEFT JOIN local ON local.path = live.path "
            "WHERE local.vid IS NULL OR local.vid != live.vid ORDER BY live.path, live.vid"
        )

    def local_without_live(self) -> list[str]:
        """Paths in the scan cache that have no live version at all."""
        rows = self.conn.execute(
            "SELECT path FROM local WHERE NOT EXISTS "
            "(SELECT 1 FROM live WHERE live.path = local.path) ORDER BY path"
        )
        return [path for (path,) in rows]

    def live_above_others(self) -> list[tuple[str, str, Version]]:
        """The live files, links and deletions that have live entries below their path,
        each with everything below it: what a file shadowing a directory's entries is
        found from, without decoding the whole share (directories, the common case of
        having entries below, are decoded alone and their subtrees never read)."""
        found: dict[tuple[str, str], Version] = {}
        rows = self.conn.execute(
            "SELECT path, vid, record FROM live AS above WHERE EXISTS (SELECT 1 FROM live "
            "WHERE live.path > above.path || '/' AND live.path < above.path || '0')"
        ).fetchall()  # 'a/' < every 'a/...' < 'a0' ('0' follows '/')
        read = "\0"  # the last path whose subtree was read: what is below it was too
        for path, vid, record in sorted(rows):
            if path[len(read) : len(read) + 1] == "/" and path.startswith(read):
                continue  # (a deleted deep tree read each level's subtree again: O(depth²))
            version = Version.decode(record)
            if version.kind == Kind.DIRECTORY:
                continue
            found[path, vid] = version
            found.update(((p, v), below) for p, v, below in self.live_under(path))
            read = path
        return [(path, vid, version) for (path, vid), version in sorted(found.items())]

    def live_named(self, fragment: str) -> list[tuple[str, str, Version]]:
        """Live versions whose path contains ``fragment`` (conflict copies, by their mark)."""
        rows = self.conn.execute(
            "SELECT path, vid, record FROM live WHERE instr(path, ?) > 0 ORDER BY path, vid",
            (fragment,),
        )
        return [(path, vid, Version.decode(record)) for path, vid, record in rows]

    def version(self, version_id: str) -> Version | None:
        row = self.conn.execute(
            "SELECT record FROM versions WHERE vid = ?", (version_id,)
        ).fetchone()
        return Version.decode(row[0]) if row else None

    def change_type(self, version: Version) -> str:
        """'added', 'modified' or 'deleted': what ``version`` did to its path."""
        if version.kind == Kind.DELETED:
            return "deleted"
        replaced = (self.version(v) for v in version.supersedes)
        if any(old is not None and old.kind != Kind.DELETED for old in replaced):
            return "modified"
        return "added"

    def note_unheld(self, device: bytes, contents: Iterable[bytes], ms: int) -> None:
        """``device`` said (signed) that it no longer holds the bytes of ``contents``."""
        self.conn.executemany(
            "INSERT OR IGNORE INTO unheld (content, device, ms) VALUES (?, ?, ?)",
            [(content, device, ms) for content in contents],
        )

    def unheld_here(self, device: bytes) -> set[bytes]:
        """The contents ``device`` said it no longer holds."""
        rows = self.conn.execute("SELECT content FROM unheld WHERE device = ?", (device,))
        return {content for (content,) in rows}

    def unheld_by(self, contents: Iterable[bytes]) -> dict[bytes, set[bytes]]:
        """For each of ``contents``: the devices that said they no longer hold it."""
        found: dict[bytes, set[bytes]] = {}
        for content in set(contents):
            rows = self.conn.execute("SELECT device FROM unheld WHERE content = ?", (content,))
            found[content] = {device for (device,) in rows}
        return found

    def history(self, path: str) -> list[HistoryEntry]:
        rows = self.conn.execute(
            "SELECT v.vid, v.record, v.author, v.position, l.vid IS NOT NULL FROM versions v "
            "LEFT JOIN live l ON l.path = v.path AND l.vid = v.vid "
            "WHERE v.path = ? ORDER BY v.position, v.vid",
            (path,),
        )
        return [
            HistoryEntry(vid, Version.decode(record), author, position, bool(live))
            for vid, record, author, position, live in rows
        ]

    def spellings(self, path: str) -> list[str]:
        """Recorded paths that are ``path`` under some Unicode normalisation (a person
        typing a name cannot tell NFC from NFD)."""
        rows = self.conn.execute(
            "SELECT DISTINCT path FROM versions WHERE nfc(path) = ? ORDER BY path", (_nfc(path),)
        )
        return [p for (p,) in rows]

    def live_containing(self, text: str) -> Iterator[tuple[str, str, Version]]:
        """Live ``(path, vid, version)`` whose path contains ``text`` (conflict copies)."""
        rows = self.conn.execute(
            "SELECT path, vid, record FROM live WHERE instr(path, ?) > 0 ORDER BY path", (text,)
        )
        for path, vid, record in rows:
            yield path, vid, Version.decode(record)

    def located(self, version_ids: Iterable[str]) -> dict[str, tuple[str, Version]]:
        """The path and record of each known version among ``version_ids``."""
        wanted, found = list(version_ids), {}
        for i in range(0, len(wanted), 500):
            part = wanted[i : i + 500]
            marks = ",".join("?" * len(part))
            query = f"SELECT vid, path, record FROM versions WHERE vid IN ({marks})"
            rows = self.conn.execute(query, part)
            found.update((vid, (path, Version.decode(record))) for vid, path, record in rows)
        return found

    def versions_under(self, top: str) -> Iterator[tuple[str, str, Version]]:
        """Every version ever recorded at ``top`` or below it ("": the whole share)."""
        select = "SELECT path, vid, record FROM versions"
        if top:  # 'a/' < every 'a/...' < 'a0' ('0' follows '/')
            rows = self.conn.execute(
                f"{select} WHERE path = ? OR (path > ? AND path < ?)", (top, top + "/", top + "0")
            )
        else:
            rows = self.conn.execute(select)
        for path, vid, record in rows:
            yield path, vid, Version.decode(record)

    def versions_at(
        self, position: int, top: str = "", skip: int = 0, limit: int = -1
    ) -> list[tuple[str, str, Version]]:
        """The versions journal event ``position`` added (at ``top`` or below it), in
        path order, from the ``skip``-th on, at most ``limit`` (-1: all)."""
        rows = self.conn.execute(
            "SELECT path, vid, record FROM versions WHERE position = ?1 AND (?2 = '' OR "
            "path = ?2 OR (path > ?2 || '/' AND path < ?2 || '0')) "
            "ORDER BY path, vid LIMIT ?3 OFFSET ?4",
            (position, top, limit, skip),
        )
        return [(path, vid, Version.decode(record)) for path, vid, record in rows]

    def positions_under(self, top: str, before: int) -> Iterator[int]:
        """The journal positions below ``before`` of the events that added a version at
        ``top`` or below it, newest first (from the path index, not the whole history)."""
        rows = self.conn.execute(
            "SELECT position FROM versions WHERE path = ?1 AND position < ?2 UNION "
            "SELECT position FROM versions WHERE path > ?1 || '/' AND path < ?1 || '0' "
            "AND +position < ?2 ORDER BY position DESC",
            (top, before),
        )
        for (position,) in rows:
            yield position

    def live_in(self, directory: str) -> list[tuple[str, str, Version]]:
        """The live versions of the entries directly in ``directory`` ("": the top),
        by path: one index range, however large the rest of the share."""
        rows = self.conn.execute(
            f"SELECT path, vid, record FROM live WHERE {PARENT} = ? ORDER BY path, vid",
            (directory + "/" if directory else "",),
        )
        return [(path, vid, Version.decode(record)) for path, vid, record in rows]

    # -- local disk cache ------------------------------------------------------------

    def local_entries(
        self, paths: Iterable[str] | None = None, subtrees: Iterable[str] = ()
    ) -> dict[str, LocalEntry]:
        """The scan cache: every entry, or only those of ``paths`` and below ``subtrees``."""
        return read_local(self.conn, paths, subtrees)

    def set_local(self, entries: Iterable[LocalEntry]) -> None:
        self.conn.executemany(
            "INSERT OR REPLACE INTO local (path, vid, size, mtime_ns, inode, mode, settled) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            entries,
        )

    def drop_local(self, paths: Iterable[str]) -> None:
        self.conn.executemany("DELETE FROM local WHERE path = ?", [(p,) for p in paths])

    # -- paths that became ignored -----------------------------------------------------

    def forget(self, entries: Iterable[LocalEntry]) -> None:
        """Leave these scan-cache entries (their paths became ignored), keeping the
        version each held: the basis of whatever the disk holds if the rule goes."""
        entries = list(entries)
        self.conn.executemany(
            "INSERT OR REPLACE INTO forgotten (path, vid) VALUES (?, ?)",
            [(e.path, e.version_id) for e in entries],
        )
        self.drop_local(e.path for e in entries)

    def forgotten_basis(self, paths: Iterable[str]) -> dict[str, str]:
        """The version this device last held at each of ``paths`` before they became
        ignored (only for paths it has not recorded since)."""
        found = {}
        for path in paths:
            row = self.conn.execute("SELECT vid FROM forgotten WHERE path = ?", (path,))
            vid = row.fetchone()
            if vid is not None:
                found[path] = vid[0]
        return found

    def all_forgotten(self) -> dict[str, str]:
        """Every path that became ignored and was not recorded since, with its basis."""
        return dict(self.conn.execute("SELECT path, vid FROM forgotten"))

    def drop_forgotten(self, paths: Iterable[str]) -> None:
        self.conn.executemany("DELETE FROM forgotten WHERE path = ?", [(p,) for p in paths])

    # -- per-file problems -----------------------------------------------------------

    def note_problems(
        self,
        source: str,
        problems: Iterable[Problem],
        now_ms: int,
        resolved: Iterable[str] = (),
        replace: bool = False,
    ) -> list[Problem]:
        """Keep ``source``'s ('scan' or 'apply') problems until resolved: ``replace``
        drops every earlier one of that source (a scan sees them all again), otherwise
        those of the ``resolved`` paths go. Returns the problems not known before (path
        and reason), so a warning already shown is not repeated on every run."""
        problems = list(problems)
        known = {
            (path, reason)
            for path, reason in self.conn.execute(
                "SELECT path, reason FROM problems WHERE source = ?", (source,)
            )
        }
        if replace:
            self.conn.execute("DELETE FROM problems WHERE source = ?", (source,))
        self.conn.executemany(
            "DELETE FROM problems WHERE source = ? AND path = ?", [(source, p) for p in resolved]
        )
        self.conn.executemany(
            "INSERT INTO problems (path, source, reason, warning, since_ms) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (path, source) DO UPDATE SET reason = excluded.reason, "
            "warning = excluded.warning, since_ms = CASE WHEN problems.reason = excluded.reason "
            "THEN problems.since_ms ELSE excluded.since_ms END",
            [(p.path, source, p.reason, p.warning, now_ms) for p in problems],
        )
        return [p for p in problems if (p.path, p.reason) not in known]

    def problems(self, source: str | None = None) -> list[tuple[str, Problem, int]]:
        """Every unresolved problem (of one ``source``): (source, problem, since when in
        ms), by path."""
        rows = self.conn.execute(
            "SELECT source, path, reason, warning, since_ms FROM problems "
            "WHERE ?1 IS NULL OR source = ?1 ORDER BY path, source",
            (source,),
        )
        return [(src, Problem(p, reason, bool(w)), since) for src, p, reason, w, since in rows]

    # -- content ---------------------------------------------------------------------

    def put_manifests(self, manifests: Iterable[tuple[str, Manifest]]) -> None:
        """Store manifests and note where their chunks can be read (path, offset). A
        row already saying so is left as it is (a file's new version shares most chunks
        with its old one at the same path, many at the same offset: no write for those)."""
        manifests = list(manifests)
        self.put_manifest_bodies(m for _, m in manifests)
        self.put_chunk_locations(manifests)

    def put_manifest_bodies(self, manifests: Iterable[Manifest]) -> None:
        """Store manifests (what a peer asks for), without their chunks' locations."""
        self.conn.executemany(
            "INSERT OR IGNORE INTO manifests (id, body) VALUES (?, ?)",
            sorted((m.id, m.encoded) for m in manifests),  # sorted keys insert ~3x faster
        )

    def put_chunk_locations(self, manifests: Iterable[tuple[str, Manifest]]) -> None:
        """Note where the chunks of each (path, manifest) can be read; see put_manifests."""
        self.conn.executemany(
            "INSERT INTO chunks (hash, path, offset, length) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (hash, path) DO UPDATE SET offset = excluded.offset, "
            "length = excluded.length WHERE offset != excluded.offset OR length != excluded.length",
            sorted((c.hash, path, c.offset, c.length) for path, m in manifests for c in m.chunks),
        )

    def manifest_bodies(self, manifest_ids: list[bytes], at_most: int) -> dict[bytes, bytes | None]:
        """The stored (encoded) manifests of ``manifest_ids`` held here, as a peer is sent
        them, one query per 500, none decoded (a first sync of 100,000 files asks for
        every one, and the serving side looked each up alone); None for one larger than
        ``at_most`` bytes (not read: a batch of large ones would be held at once)."""
        select = f"SELECT id, CASE WHEN length(body) <= {int(at_most)} THEN body END FROM manifests"
        found = {row[0]: row[1] for row in rows_where_in(self.conn, select, "id", manifest_ids)}
        if EMPTY_MANIFEST.id in manifest_ids:
            found[EMPTY_MANIFEST.id] = EMPTY_MANIFEST.encoded
        return found

    def manifest(self, manifest_id: bytes) -> Manifest | None:
        if manifest_id == EMPTY_MANIFEST.id:  # every device has the empty file's manifest
            return EMPTY_MANIFEST
        cached = self._manifests.get(manifest_id)
        if cached is not None:
            return cached
        row = self.conn.execute(
            "SELECT body FROM manifests WHERE id = ?", (manifest_id,)
        ).fetchone()
        return None if row is None else self._cache(manifest_id, row[0])

    def load_manifests(self, manifest_ids: Iterable[bytes]) -> None:
        """Bring the stored manifests of ``manifest_ids`` into the cache :meth:`manifest`
        reads, one query per 500: a window of a first sync looks up 5,000 manifests, one
        query each took ~9 µs more per manifest (at most MANIFEST_CACHE are kept)."""
        wanted = list(dict.fromkeys(m for m in manifest_ids if m not in self._manifests))
        select = "SELECT id, body FROM manifests"
        for manifest_id, body in rows_where_in(self.conn, select, "id", wanted[:MANIFEST_CACHE]):
            self._cache(manifest_id, body)

    def _cache(self, manifest_id: bytes, body: bytes) -> Manifest:
        if len(self._manifests) >= MANIFEST_CACHE:  # forget the oldest (dicts keep order)
            del self._manifests[next(iter(self._manifests))]
        manifest = self._manifests[manifest_id] = Manifest.decode(body)
        return manifest

    def move_chunk_locations(self, old_path: str, new_path: str) -> None:
        """Chunks read from ``old_path`` can now be read from ``new_path``."""
        self.conn.execute(
            "UPDATE OR REPLACE chunks SET path = ? WHERE path = ?", (new_path, old_path)
        )

    def chunk_locations(self, chunk_hash: bytes) -> list[tuple[str, int, int]]:
        """Every place this chunk's bytes were seen (any may be stale: verify on read)."""
        rows = self.conn.execute(
            "SELECT path, offset, length FROM chunks WHERE hash = ?",
            (chunk_hash,),
        )
        return [(row[0], row[1], row[2]) for row in rows]

    def chunk_locations_of(
        self, hashes: Iterable[bytes]
    ) -> dict[bytes, list[tuple[str, int, int]]]:
        """:meth:`chunk_locations` of many chunks at once (one query per 500, not one
        per chunk: a large file has thousands)."""
        found: dict[bytes, list[tuple[str, int, int]]] = {}
        select = "SELECT hash, path, offset, length FROM chunks"
        for row in rows_where_in(self.conn, select, "hash", sorted(set(hashes))):
            found.setdefault(row[0], []).append((row[1], row[2], row[3]))
        return found

    # -- membership ------------------------------------------------------------------

    def add_member(self, key: bytes, name: str, added_by: bytes, seq: int) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO members (key, name, added_by, added_seq) VALUES (?, ?, ?, ?)",
            (key, name, added_by, seq),
        )

    def admissions(self) -> list[tuple[bytes, bytes, int]]:
        """(device, admitting device, seq of its event) of every member, oldest first."""
        query = "SELECT key, added_by, added_seq FROM members ORDER BY rowid"
        return [(key, by, seq) for key, by, seq in self.conn.execute(query)]

    def remove_member(self, key: bytes, kept: int, removed_by: bytes, seq: int) -> None:
        self.conn.execute(
            "UPDATE members SET kept = ?, removed_by = ?, removed_seq = ? WHERE key = ?",
            (kept, removed_by, seq, key),
        )

    def undo_member_changes(self, author: bytes, seq: int) -> tuple[list[bytes], list[bytes]]:
        """Undo the admissions and removals ``author`` signed from event ``seq`` on (it
        was removed at that point): (devices no longer removed, devices no longer in)."""
        restored = [
            key
            for (key,) in self.conn.execute(
                "SELECT key FROM members WHERE removed_by = ? AND removed_seq >= ?", (author, seq)
            )
        ]
        self.conn.execute(
            "UPDATE members SET kept = NULL, removed_by = NULL, removed_seq = NULL "
            "WHERE removed_by = ? AND removed_seq >= ?",
            (author, seq),
        )
        dropped = [
            key
            for (key,) in self.conn.execute(
                "SELECT key FROM members WHERE added_by = ? AND added_seq >= ? AND key != ?",
                (author, seq, author),
            )
        ]
        self.conn.execute(
            "DELETE FROM members WHERE added_by = ? AND added_seq >= ? AND key != ?",
            (author, seq, author),
        )
        return restored, dropped

    def rename_member(self, key: bytes, name: str, seq: int) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO renames (key, seq, name) VALUES (?, ?, ?)", (key, seq, name)
        )

    def undo_renames(self, key: bytes, kept: int) -> str:
        """Drop the renames a device signed from event ``kept`` on (it was removed at that
        point); its name now: the last rename before, or the one it was admitted with."""
        self.conn.execute("DELETE FROM renames WHERE key = ? AND seq >= ?", (key, kept))
        return self.conn.execute(
            f"SELECT {_MEMBER_NAME} FROM members WHERE key = ?", (key,)
        ).fetchone()[0]

    def member_table(self) -> tuple[dict[bytes, str], dict[bytes, int]]:
        """(every admitted key -> name, removed key -> how many of its events count)."""
        names, removed = {}, {}
        for key, name, kept in self.conn.execute(
            f"SELECT key, {_MEMBER_NAME}, kept FROM members ORDER BY rowid"
        ):
            names[key] = name
            if kept is not None:
                removed[key] = kept
        return names, removed

    def add_invite(self, invite_id: bytes, psk: bytes, expires_ms: int, raw: bytes) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO invites (id, psk, expires_ms, raw) VALUES (?, ?, ?, ?)",
            (invite_id, psk, expires_ms, raw),
        )

    def use_invite(self, invite_id: bytes, device_key: bytes, now_ms: int = 0) -> bool:
        """Mark an unused invite used (unexpired at ``now_ms``); whether it was."""
        cursor = self.conn.execute(
            "UPDATE invites SET used_by = ? WHERE id = ? AND used_by IS NULL AND expires_ms >= ?",
            (device_key, invite_id, now_ms),
        )
        return cursor.rowcount == 1

    def revoke_invites(self, marker: bytes) -> None:
        """Every unused invite becomes unusable (``marker`` as its user)."""
        self.conn.execute("UPDATE invites SET used_by = ? WHERE used_by IS NULL", (marker,))

    def invite(self, invite_id: bytes) -> tuple[bytes, int, bytes | None] | None:
        """(psk, expires_ms, used_by) of an invite this device has seen."""
        row = self.conn.execute(
            "SELECT psk, expires_ms, used_by FROM invites WHERE id = ?", (invite_id,)
        ).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def invite_event(self, invite_id: bytes) -> bytes:
        """The signed event that made an invite (empty if unknown)."""
        row = self.conn.execute("SELECT raw FROM invites WHERE id = ?", (invite_id,)).fetchone()
        return row[0] or b"" if row else b""

    # -- addresses -------------------------------------------------------------------

    def note_address(
        self, device: bytes, host: str, port: int, now_ms: int, source: str | None
    ) -> None:
        """Seen now (from ``source``), or, with ``source`` None, connected to now."""
        success = now_ms if source is None else None
        self.conn.execute(
            "INSERT INTO addresses (device, host, port, source, seen_ms, success_ms) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (device, host, port) DO UPDATE SET "
            "source = COALESCE(excluded.source, source), seen_ms = excluded.seen_ms, "
            "success_ms = COALESCE(excluded.success_ms, success_ms)",
            (device, host, port, source or "dialled", now_ms, success),
        )

    def addresses_of(self, device: bytes) -> list[tuple[str, int, str, int, int | None]]:
        """(host, port, source, seen_ms, success_ms), last connected first, then newest."""
        return self.conn.execute(
            "SELECT host, port, source, seen_ms, success_ms FROM addresses WHERE device = ? "
            "ORDER BY success_ms IS NULL, success_ms DESC, seen_ms DESC, host, port",
            (device,),
        ).fetchall()

    def address_devices(self) -> list[bytes]:
        """Devices with an address, the most recently seen or connected to first."""
        rows = self.conn.execute(
            "SELECT device FROM addresses GROUP BY device "
            "ORDER BY MAX(MAX(seen_ms, COALESCE(success_ms, 0))) DESC, device"
        )
        return [row[0] for row in rows]

    def drop_addresses(self, device: bytes, keep: int = 0) -> None:
        """Forget the addresses of ``device`` but the best ``keep`` (in the order above)."""
        doomed = self.addresses_of(device)[keep:]
        self.conn.executemany(
            "DELETE FROM addresses WHERE device = ? AND host = ? AND port = ?",
            [(device, host, port) for host, port, *_ in doomed],
        )

    def announcements(self) -> dict[bytes, tuple[int, bytes]]:
        """device -> (time_ms, raw) of the newest announcement held."""
        rows = self.conn.execute("SELECT device, time_ms, raw FROM announcements")
        return {device: (time_ms, raw) for device, time_ms, raw in rows}

    def put_announcement(self, device: bytes, time_ms: int, raw: bytes) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO announcements (device, time_ms, raw) VALUES (?, ?, ?)",
            (device, time_ms, raw),
        )

    def drop_announcement(self, device: bytes) -> None:
        self.conn.execute("DELETE FROM announcements WHERE device = ?", (device,))

    # -- totals ----------------------------------------------------------------------

    def totals(self) -> dict[str, int]:
        """Counts of live entries by kind, and bytes of live files: added up inside
        SQLite from each record's kind byte and size field (a third of the time of
        decoding every version; ``status`` asks on shares of 100,000s of files)."""
        counts = {kind: 0 for kind in Kind}
        total_bytes = 0
        rows = self.conn.execute(
            "SELECT unicode(substr(record, 1, 1)) AS kind, count(*), sum(record_size(record)) "
            "FROM live GROUP BY kind"
        )
        for kind, count, size in rows:
            counts[Kind(kind)] += count
            if kind == Kind.FILE:
                total_bytes += size
        return {
            "files": counts[Kind.FILE],
            "directories": counts[Kind.DIRECTORY],
            "symlinks": counts[Kind.SYMLINK],
            "deleted": counts[Kind.DELETED],
            "bytes": total_bytes,
        }
