"""Turn the merged state into files on disk: resolve, plan deterministically, apply safely.

1. :func:`resolve` (pure) decides, from a path's live versions alone, what every device
   will decide: a modification beats a concurrent deletion; identical contents are one
   version; otherwise the version modified last (directories before files) keeps the path and
   each other content becomes a conflict copy
   ``name.sync-conflict-YYYYMMDD-HHMMSS-DEVICE.ext`` whose name, key and record derive
   only from the losing version itself. The share records that resolution in the state,
   so all devices converge on the same keys.
2. :func:`plan` compares the live state with what this device last put on (or saw on)
   disk and lists the operations, in a fixed order: directories and files in path
   order, then deletions deepest first.
3. :class:`Materializer` applies them: temp file in the target directory, every chunk
   verified, every write checked, the finished file re-hashed against its manifest
   (chunks copied from local files are hashed as they are copied: the bytes written),
   made durable, then a re-check that the target is exactly as the plan saw
   it (if not, it is a local edit: it is left alone for the scanner, never clobbered),
   the old contents hard-linked into the content store (``.backer/store/``), an atomic rename and a
   directory fsync. A crash leaves the old file or the new one, never a torn one.
   Writes are staged in batches (up to 1,000 files or 256 MiB): one ``syncfs`` makes a
   whole batch of temp files durable before any of them is renamed, and each directory
   is fsynced once per batch — one flush instead of two per file.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import ctypes
import errno
import functools
import itertools
import os
import secrets
import sqlite3
import stat
import threading
from collections import deque
from collections.abc import Callable, Container, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from blake3 import blake3

from backer.db.catalog import EMPTY_MANIFEST, Catalog, LocalEntry, Problem, rows_where_in
from backer.errors import BackerError
from backer.fs.dirs import Directories, Identity, InShare, NotADirectory
from backer.fs.paths import (
    MAX_NAME_BYTES,
    METADATA_DIR,
    BadPath,
    check,
    fitted_name,
    stem_and_extension,
)
from backer.fs.spelling import Spellings
from backer.model import entropy
from backer.model.records import PERMISSION_BITS, VERSION_ID_BYTES, Kind, Version, timestamp
from backer.scanner.chunks import ChunkStore, Run, start_writeback, write_all
from backer.scanner.content import MAX_CHUNK, ChunkRef, Manifest, check_manifest, manifest_of_file
from backer.scanner.ignore import CONFLICT_MARK, IgnoreRules, temp_name
from backer.scanner.walk import cache_entry, entry_key, stat_key_of
from backer.versioner.store import Store

# -- resolution (pure) ----------------------------------------------------------------------


@dataclass
class Resolution:
    """What to change in the state so that ``path`` has exactly one live version."""

    drop: list[str] = field(default_factory=list)  # version ids to remove at the path
    copies: list[tuple[str, str, Version]] = field(default_factory=list)  # (path, vid, version)


def conflict_path(path: str, version: Version) -> str:
    """``dir/name.sync-conflict-YYYYMMDD-HHMMSS-DEVICE.ext``, from the version's own data;
    the stem (then the extension) is cut so that the name fits MAX_NAME_BYTES. A cut
    name also carries a tag of the path and the content (the same on every device): cut
    back, a copy's copy came out as the name itself or as the name of an earlier copy in
    its line, each conflicting with the next, and devices linked by ``backer run``
    resolved them back and forth without end."""
    parent, _, name = path.rpartition("/")
    stamp = timestamp(version.time_ms, "%Y%m%d-%H%M%S")
    device = base64.b32encode(version.device).decode()[:7]
    mark = f"{CONFLICT_MARK}{stamp}-{device}"
    stem, ext = stem_and_extension(name, mark)
    if len(os.fsencode(stem + mark + ext)) <= MAX_NAME_BYTES:
        copy = stem + mark + ext
    else:
        tag = blake3(os.fsencode(path) + version.content).hexdigest()[:8]
        copy = fitted_name(stem, f"{mark}-{tag}{ext}")
    return f"{parent}/{copy}" if parent else copy


def copy_version_id(version_id: str) -> str:
    """The key of the conflict copy of ``version_id``: the same on every device."""
    digest = blake3(b"conflict-copy:" + version_id.encode()).digest()[:VERSION_ID_BYTES]
    return base64.urlsafe_b64encode(digest).decode()


def _signature(version: Version) -> tuple[Kind, bytes, int]:
    return version.kind, version.content, version.permissions


def precedence(item: tuple[str, Version]) -> tuple[bool, int, int, bytes, str]:
    """Which of two concurrent versions keeps the path: a directory over a file, then the
    later modification time on the writer's disk (the edit made last, as Syncthing
    decides — not whichever device happened to scan last), then the later record time,
    the writer's key and the version id, so every device picks the same one."""
    vid, version = item
    return (
        version.kind == Kind.DIRECTORY,
        version.mtime_ns,
        version.time_ms,
        version.device,
        vid,
    )


def resolve(path: str, live: dict[str, Version]) -> Resolution:
    """Deterministic resolution of a path's live versions (see the module docstring)."""
    result = Resolution()
    if len(live) < 2:
        return result
    existing = {vid: v for vid, v in live.items() if v.kind != Kind.DELETED}
    if not existing:
        result.drop = sorted(live)[1:]
        return result
    result.drop = sorted(vid for vid, v in live.items() if v.kind == Kind.DELETED)
    winner_id, winner = max(existing.items(), key=precedence)
    groups: dict[tuple[Kind, bytes, int], list[tuple[str, Version]]] = {}
    for item in existing.items():
        groups.setdefault(_signature(item[1]), []).append(item)
    for signature, members in sorted(groups.items(), key=lambda g: max(map(precedence, g[1]))):
        result.drop.extend(sorted(vid for vid, _ in members if vid != winner_id))
        if signature == _signature(winner):
            continue
        loser_id, loser = max(members, key=precedence)
        result.copies.append(_conflict_copy(path, loser_id, loser))
    return result


def _conflict_copy(path: str, version_id: str, version: Version) -> tuple[str, str, Version]:
    """The (path, key, record) of the conflict copy of one version: the same everywhere.
    The copy names the version it carries in ``supersedes`` (its lineage)."""
    copy = Version(
        version.kind,
        version.size,
        version.mtime_ns,
        version.permissions,
        version.content,
        version.device,
        version.time_ms,
        (version_id,),
    )
    return conflict_path(path, version), copy_version_id(version_id), copy


def is_copy_of(version_id: str, version: Version) -> str | None:
    """The version a conflict copy carries, if ``version`` is one."""
    if len(version.supersedes) == 1 and copy_version_id(version.supersedes[0]) == version_id:
        return version.supersedes[0]
    return None


def resolve_moot_copies(
    live: Iterable[tuple[str, str, Version]], superseded_elsewhere: Callable[[str, str], bool]
) -> dict[str, Resolution]:
    """Conflict copies whose source version its own device later replaced or deleted:
    the person moved on from that version, and its bytes may be gone from every disk,
    so the copy is dropped (the later version is live and conflicts in its own right)."""
    result: dict[str, Resolution] = {}
    for path, vid, version in live:
        source = is_copy_of(vid, version)
        if source is not None and superseded_elsewhere(source, vid):
            result.setdefault(path, Resolution()).drop.append(vid)
    return result


def resolve_shadowed(live: Iterable[tuple[str, str, Version]]) -> dict[str, Resolution]:
    """Files and links that have live entries below them (one device deleted a directory
    and made a file of that name while another wrote inside it): the directory is
    needed, so each such file or link moves to its conflict copy. Pure, deterministic."""
    existing = sorted((p, vid, v) for p, vid, v in live if v.kind != Kind.DELETED)
    paths = [p for p, _, _ in existing]
    result: dict[str, Resolution] = {}
    for path, vid, version in existing:
        if version.kind == Kind.DIRECTORY:
            continue
        below = bisect.bisect_left(paths, path + "/")
        if below < len(paths) and paths[below].startswith(path + "/"):
            resolution = result.setdefault(path, Resolution())
            resolution.drop.append(vid)
            resolution.copies.append(_conflict_copy(path, vid, version))
    return result


# -- planning -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)  # a first sync's plan holds one per file
class Operation:
    path: str
    version_id: str
    version: Version
    on_disk: str | None = None  # the version recorded here when planned ("": none)

    def still_planned(self, cached: LocalEntry | None) -> None:
        """Raise LocalEdit if a scan recorded another version here since the plan: the
        operation was decided against what the disk held then, never against a newer
        local version."""
        if self.on_disk is not None and (cached.version_id if cached else "") != self.on_disk:
            raise LocalEdit(self.path)


class Plan:
    """A plan's operations, held in a private SQLite database instead of as
    objects: a first sync plans one operation per file (~423 bytes each: 43 MB for
    100,000 files, at the join's peak), and only the window being applied is decoded.
    Writes are taken in path order, then every deletion at once, deepest first; each
    leaves the plan as it is taken. Iterating reads what is left without taking it."""

    def __init__(self, directory: Path) -> None:
        """The database is a file in ``directory`` (the share's ``.backer/``: the disk
        the plan is for, whose room backer checks), unlinked as soon as it exists, as
        SQLite's own temp files are: nothing of it outlives the process. Its one
        transaction is never committed: a plan within the page cache (2 MiB) never
        touches the disk; a larger one spills its pages there. SQLite's temp
        database (``""``) spilled to the system's temp directory instead, which may be
        a small or full tmpfs while the share's disk has room (R42). An unlink that
        fails (EIO) is tried again at :meth:`close`."""
        self._name = directory / f"plan-{secrets.token_hex(8)}.db"
        self._db = sqlite3.connect(self._name, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=OFF")  # (a plan need not survive a crash)
            self._db.execute("PRAGMA temp_store=MEMORY")  # (its sorts: not in TMPDIR either)
        finally:
            self._unlink()
        self._db.execute("BEGIN")
        self._db.execute(
            "CREATE TABLE ops (path TEXT, vid TEXT, record BLOB, on_disk TEXT, "
            "deletion INTEGER, content BLOB)"
        )
        self.files = self.bytes = self.writes = 0  # planned: operations, their bytes, the
        # files and links among them
        self._taken = 0  # operations taken
        self.bytes_untaken = 0  # of the files not taken yet (a window's fetch not known yet)
        self._after = 0  # the rowid of the last write taken
        self._deletions_taken = False

    def add(self, operations: Iterable[tuple[str, str, bytes, Version, str]]) -> None:
        """Append operations (path, version id, record, version, on_disk), writes in
        path order, with one statement: a first sync ran one per file."""
        insert = "INSERT INTO ops VALUES (?, ?, ?, ?, ?, ?)"
        self._db.executemany(insert, map(self._row, operations))

    def _row(
        self, operation: tuple[str, str, bytes, Version, str]
    ) -> tuple[str, str, bytes, str, bool, bytes | None]:
        """The ops row of an operation, counted."""
        path, vid, record, version, on_disk = operation
        kind = version.kind
        size = version.size if kind == Kind.FILE else 0
        self.files += 1
        self.bytes += size
        self.bytes_untaken += size
        self.writes += kind in (Kind.FILE, Kind.SYMLINK)
        content = version.content if kind == Kind.FILE else None
        if content == EMPTY_MANIFEST.id:
            content = None  # (nothing to fetch)
        return path, vid, record, on_disk, kind == Kind.DELETED, content

    def ready(self) -> Plan:
        """Every operation is added: index the paths for ``in``."""
        self._db.execute("CREATE INDEX ops_path ON ops (path)")
        return self

    def close(self) -> None:
        self._db.close()
        self._unlink()

    def _unlink(self) -> None:
        with contextlib.suppress(OSError):
            self._name.unlink(missing_ok=True)

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.files - self._taken

    def __contains__(self, path: object) -> bool:
        """Whether ``path`` was planned (taken or not)."""
        found = self._db.execute("SELECT 1 FROM ops WHERE path = ? LIMIT 1", (path,))
        return found.fetchone() is not None

    def _rows(self, limit: int = -1) -> Iterator[tuple[str, str, bytes, str, int]]:
        if self._deletions_taken:
            return
        yield from self._db.execute(
            "SELECT path, vid, record, on_disk, rowid FROM ops "
            "WHERE deletion = 0 AND rowid > ? ORDER BY rowid LIMIT ?",
            (self._after, limit),
        )
        yield from self._db.execute(
            "SELECT path, vid, record, on_disk, 0 FROM ops WHERE deletion = 1 ORDER BY path DESC"
        )

    def __iter__(self) -> Iterator[Operation]:
        for path, vid, record, on_disk, _ in self._rows():
            yield Operation(path, vid, Version.decode(record), on_disk)

    def take(self, max_files: int, max_bytes: int) -> list[Operation]:
        """The next writes, until ``max_files`` or ``max_bytes`` is reached (the file
        that reaches it included); once none is left, every deletion."""
        taken: list[Operation] = []
        size = 0
        for path, vid, record, on_disk, rowid in self._rows(max_files):
            version = Version.decode(record)
            if version.kind == Kind.DELETED:
                if taken and not self._deletions_taken:
                    break  # (after writes: the deletions come as one window)
                self._deletions_taken = True
            elif size >= max_bytes:
                break
            else:
                self._after = rowid
                size += version.size
            taken.append(Operation(path, vid, version, on_disk))
            self.bytes_untaken -= version.size if version.kind == Kind.FILE else 0
        self._taken += len(taken)
        return taken

    def manifests_needed(self, catalog: Catalog) -> list[bytes]:
        """The chunk lists the plan's files need that this device does not hold: looked
        up 500 at a time (a first sync of 100,000 files asked once per file, every one a
        miss)."""
        wanted = [
            content
            for (content,) in self._db.execute(
                "SELECT DISTINCT content FROM ops WHERE content IS NOT NULL ORDER BY content"
            )
        ]
        select = "SELECT id FROM manifests"
        held = {row[0] for row in rows_where_in(catalog.conn, select, "id", wanted)}
        return [content for content in wanted if content not in held]


_T = TypeVar("_T")
PLAN_LOOKUPS = 500  # scan cache entries looked up at once while planning


def _batches(items: Iterable[_T], size: int) -> Iterator[list[_T]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def plan(
    catalog: Catalog,
    root: Path,
    excluded: Callable[[str, bool], bool] | None = None,
    unwritable: Container[tuple[str, str]] = (),
) -> Plan:
    """Operations that bring the share at ``root`` to the live state: creations and
    updates in path order (parents first), then deletions deepest first. Paths
    ``excluded`` by this device's ignore rules are never written or deleted; versions
    found ``unwritable`` here, (path, version id), are not tried again (their problem
    stays reported). Read from the catalog a few hundred rows at a time, never all at
    once; held in ``root``'s ``.backer/`` (DiskFull if that disk has no room for it)."""
    planned = Plan(root / METADATA_DIR)
    try:
        return _fill(planned, catalog, excluded, unwritable)
    except BaseException as exc:
        planned.close()
        if (
            isinstance(exc, sqlite3.OperationalError)
            and exc.sqlite_errorcode == sqlite3.SQLITE_FULL
        ):
            raise DiskFull(root, SPACE_RESERVE) from exc
        raise


def _fill(
    planned: Plan,
    catalog: Catalog,
    excluded: Callable[[str, bool], bool] | None,
    unwritable: Container[tuple[str, str]],
) -> Plan:
    """:func:`plan`'s operations added to ``planned``."""
    unresolved = set(catalog.conflicted_paths())  # left for the next resolution round
    differ = (row for row in catalog.live_not_on_disk() if row[0] not in unresolved)
    for rows in _batches(differ, PLAN_LOOKUPS):
        local = catalog.local_entries([path for path, _, _ in rows])
        writes = []
        for path, vid, record in rows:
            version = Version.decode(record)
            cached = local.get(path)
            if excluded is not None and excluded(path, version.kind == Kind.DIRECTORY):
                continue
            if (path, vid) in unwritable or (version.kind == Kind.DELETED and cached is None):
                continue
            writes.append((path, vid, record, version, cached.version_id if cached else ""))
        planned.add(writes)
    gone = Version(Kind.DELETED)
    orphans = catalog.local_without_live()  # nothing live here any more (moved to a copy)
    for paths in _batches(orphans, PLAN_LOOKUPS):
        planned.add(
            (path, cached.version_id, gone.encode(), gone, cached.version_id)
            for path, cached in catalog.local_entries(paths).items()
            if excluded is None or not excluded(path, stat.S_ISDIR(cached.mode))
        )
    return planned.ready()


def not_in_place(catalog: Catalog, root: Path) -> Iterator[tuple[str, Version]]:
    """The live files, links and folders that this device does not hold as the state
    says (its scan cache names another version at their path, or none), in path order:
    what a plan would still write, but where this device's rules ignore the path or a
    conflict waits for its resolution. What a one-shot sync left out, and ``status``
    names: a file listed that no reachable device could give is not silently absent."""
    excluded = IgnoreRules.load(root).excluded
    unresolved = set(catalog.conflicted_paths())
    for path, _, record in catalog.live_not_on_disk():
        version = Version.decode(record)
        if version.kind == Kind.DELETED or path in unresolved:
            continue
        if not excluded(path, version.kind == Kind.DIRECTORY):
            yield path, version


def discard_temp(temp: Path) -> None:
    """Remove a kept temp file. One already gone is no error, nor one whose folder has
    since become a file (ENOTDIR, not ENOENT: the temp went with the folder)."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        temp.unlink()


def stale_temps(
    root: Path, catalog: Catalog, found: Iterable[Path], in_use: set[str]
) -> list[Path]:
    """The temp files among ``found`` (backer's, by their names) that nothing will use:
    neither an assembly in progress (``in_use``, paths relative to ``root``: a window
    names each of its thousands of temps there, a ``Path`` each cost more than the
    look-up ever saves) nor the next attempt at a version still to be written here —
    an interrupted transfer's temp is kept, so that its verified chunks are not fetched
    again. A version at a path this device's rules ignore is never written here, so its
    temp goes too."""
    candidates = [p for p in found if p.relative_to(root).as_posix() not in in_use]
    if not candidates:
        return []
    directories = {p.parent for p in candidates}
    excluded = IgnoreRules.load(root).excluded
    pending = {
        path: vid
        for path, vid, version in catalog.all_live()
        if version.kind in (Kind.FILE, Kind.SYMLINK)
        and (root / path).parent in directories
        and not excluded(path, False)
    }
    written = catalog.local_entries(pending)
    wanted = {
        (root / path).with_name(temp_name(path, vid))
        for path, vid in pending.items()
        if path not in written or written[path].version_id != vid
    }
    return [p for p in candidates if p not in wanted]


# -- applying -----------------------------------------------------------------------------


@dataclass
class Report:
    written: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    kept_local_edits: list[str] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)
    bytes_written: int = 0
    kept_temps: list[Path] = field(default_factory=list)  # ignored since: for the sweep
    unwritable: list[tuple[str, str]] = field(default_factory=list)  # (path, version id)
    # recorded folders a file or link was to replace, not empty yet (kept_local_edits too)
    folders_in_the_way: list[str] = field(default_factory=list)


class LocalEdit(Exception):
    """The target changed since the plan was made: leave it to the scanner."""


MB = 1024 * 1024
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
SPACE_RESERVE = 8 * MB  # kept free for the database and the directories a window adds
LEFT_OUT = "not written: no room on the disk for it"
# what fails the same way on every attempt, for a reason of this device (its filesystem,
# the share's own path): retrying it on every plan only churns
LASTING = frozenset({errno.ENAMETOOLONG, errno.EILSEQ})


class DiskFull(BackerError):
    """The share's filesystem has no room: the transfer stops (every temp file of the
    window removed) and the next run, once there is room, takes it up again."""

    def __init__(self, directory: Path, short: int) -> None:
        super().__init__(f"disk full: {max(1, -(-short // MB))} MB more needed in {directory}")


class _OutOfSpace(OSError):
    """ENOSPC or EDQUOT: not one file's problem, the whole window stops. Still an
    ``OSError`` of its errno: where no window catches it (a restore's last directory
    fsync) it is the full disk it was, for the caller's own handling of one."""

    def __init__(self, path: str, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror, path)


def _path_max(root: Path) -> int:
    """The longest path (in bytes, with its NUL) this device's filesystem takes."""
    try:
        return os.pathconf(root, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 4096


def _free_bytes(directory: Path) -> int:
    info = os.statvfs(directory)
    return info.f_bavail * info.f_frsize


class _reported:
    """Whatever stops one operation is reported against its path; the others go on.
    A full disk is not one path's problem: it goes up as :class:`_OutOfSpace`. A
    :data:`LASTING` failure of ``version_id``, or a path no device may hold, is noted
    as unwritable. (A class, not a generator: a first sync enters three per file.)"""

    __slots__ = ("path", "report", "version_id")

    def __init__(self, path: str, report: Report, version_id: str = "") -> None:
        self.path, self.report, self.version_id = path, report, version_id

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, traceback: object) -> bool:
        if exc is None:
            return False
        path, report, version_id = self.path, self.report, self.version_id
        if isinstance(exc, LocalEdit):
            report.kept_local_edits.append(path)
        elif isinstance(exc, OSError):
            if exc.errno in NO_SPACE:
                raise _OutOfSpace(path, exc) from exc
            if exc.errno in LASTING and version_id:
                report.unwritable.append((path, version_id))
            report.errors.append(Problem(path, exc.strerror or str(exc)))
        elif isinstance(exc, BadPath | ValueError):
            if isinstance(exc, BadPath) and version_id:  # (taken in before paths were bounded)
                report.unwritable.append((path, version_id))
            report.errors.append(Problem(path, str(exc)))
        else:
            return False
        return True


def unavailable(chunks: int) -> str:
    """Why a file whose chunks every connected device lacked was not written: its
    version stays live and unwritten here, asked again of each device that connects."""
    return f"not written: no connected device has its bytes ({chunks} chunks missing)"


def verify(fd: int, manifest: Manifest, checked: Container[int] = ()) -> None:
    """Re-read a finished file and check every chunk's BLAKE3 against the manifest, so
    that bytes a write lost or mangled never become a recorded version. The chunks at
    offsets ``checked`` were written from a buffer hashed right before (copied local
    chunks, see :meth:`ChunkStore.copy`) or re-read when a resumed temp was taken over:
    once is enough."""
    if os.fstat(fd).st_size != manifest.size:
        raise ValueError("the written file has the wrong size")
    for ref in manifest.chunks:
        if ref.offset not in checked and not _holds(fd, ref):
            raise ValueError("the written bytes do not match the version; not applied")


def seal(
    temp: Path | InShare, manifest: Manifest, version: Version, checked: Container[int] = ()
) -> None:
    """Verify a complete temp file (:func:`verify`), then give it the version's
    permissions and the writer's modification time (as ``rsync -a`` does)."""
    fd = _open_read(temp)
    try:
        verify(fd, manifest, checked)
        os.fchmod(fd, version.permissions or 0o644)
        if version.mtime_ns:
            os.utime(fd, ns=(version.mtime_ns, version.mtime_ns))
    finally:
        os.close(fd)


def _check_and_flush(
    temp: InShare, manifest: Manifest, checked: frozenset[int], copy: Future[_Copied] | None
) -> bool:
    """:func:`verify` a complete temp file and fsync it: run in a worker thread as soon
    as a large file's last chunk is written, while the rest of the window arrives
    (BLAKE3, ``pread`` and ``fsync`` release the GIL), after the file's local ``copy``
    (another thread: the next file's copy runs while this one is flushed). False, with
    nothing done, when the copy left chunks to fetch. The commit still verifies the
    outcome and fsyncs (at once: the pages are clean by then)."""
    if copy is not None:
        copied = copy.result()
        if copied.stale:
            return False
        checked = checked | copied.verified
    fd = temp.open(os.O_RDONLY)
    try:
        verify(fd, manifest, checked)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


@dataclass
class _Copied:
    verified: set[int]  # offsets of the chunks copied with verified bytes
    stale: list[ChunkRef]  # chunks whose source changed: from another place or a peer


def _copy_local(store: ChunkStore, fd: int, runs: list[Run], stop: threading.Event) -> _Copied:
    """Copy a file's local runs into its temp file ``fd`` (closed at the end) in a worker
    thread (:meth:`ChunkStore.copy`, no database access); the chunks whose source
    changed since it was indexed are returned as stale."""
    try:
        verified = store.copy(fd, runs, stop)
        stale = [ref for run in runs for ref in run.chunks if ref.offset not in verified]
        return _Copied(verified, stale)
    finally:
        os.close(fd)


def _open_read(temp: Path | InShare) -> int:
    if isinstance(temp, InShare):
        return temp.open(os.O_RDONLY)
    return os.open(temp, os.O_RDONLY | os.O_NOFOLLOW)


def _fsync_dir_reported(dirs: Directories, directory: str, report: Report) -> None:
    """fsync a directory (relative to the share) after renames or removals in it (one
    gone since, deleted after its entries, needs none); a failure is reported against
    it."""
    with (
        _reported(directory or ".", report),
        contextlib.suppress(FileNotFoundError, NotADirectory),
        dirs.at(directory) as fd,
    ):
        os.fsync(fd)


_libc = ctypes.CDLL(None, use_errno=True)  # (the process's own libc: find_library runs ldconfig)
_syncfs = getattr(_libc, "syncfs", None)


def _make_durable(root: Path, staged: list[_Staged], report: Report) -> list[_Staged]:
    """Flush the staged files to disk; return the entries that are durable. For many
    small files one ``syncfs`` where the system has it (Linux); else, and for large files
    (whose own bytes dominate, while ``syncfs`` would also flush whatever else is dirty on
    the filesystem), an fsync per file. A link is never opened (that would follow it):
    its durability is the directory fsync after its rename. A file whose fsync fails is
    reported and dropped (its temp removed)."""
    files = [s for s in staged if s.op.version.kind == Kind.FILE]
    size = sum(s.op.version.size for s in files)
    if _syncfs is not None and size < len(files) * SYNCFS_BELOW_AVERAGE:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _syncfs(fd) == 0:
                return staged
        finally:
            os.close(fd)
    durable = []
    for item in staged:
        if item.op.version.kind == Kind.FILE:
            with _reported(item.op.path, report), _removing(item.temp):
                fd = item.temp.open(os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                durable.append(item)
        else:
            durable.append(item)
    return durable


def _replace_looked_at(temp: InShare, target: InShare, looked: os.stat_result) -> None:
    """Put ``temp`` in place of the recorded entry found at ``target`` a moment ago (its
    bytes kept in the store): swapped in one step, the entry swapped out must be the one
    looked at — else the person replaced it in between (an editor's save): theirs is
    swapped back and it is a local edit (R45). Where no swap can be made, os.replace."""
    if not temp.exchange(target):
        temp.replace(target)
        return
    out = temp.lstat()
    if (out.st_dev, out.st_ino) != (looked.st_dev, looked.st_ino):
        temp.exchange(target)
        raise LocalEdit(target.relative)
    temp.unlink()


class _removing:
    """Remove ``temp`` if the block fails: a temp file whose write failed never stays.
    (A class, not a generator: a first sync enters two per file.)"""

    __slots__ = ("temp",)

    def __init__(self, temp: InShare) -> None:
        self.temp = temp

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, traceback: object) -> bool:
        if exc is not None:
            self.temp.remove()
        return False


@dataclass
class _Staged:
    """A file or link being put together under its temp name."""

    op: Operation
    cached: LocalEntry | None
    temp: InShare
    target: InShare
    missing: int = 0  # chunks still to arrive
    created: bool = False
    checked: set[int] = field(default_factory=set)  # offsets written or found verified

    def open(self) -> int:
        """A descriptor on the temp file, which is created (0600, sized: a hole where
        nothing is written) the first time; the version's permissions are set once it
        is complete (:func:`seal`), so a read-only file can still be filled."""
        if self.created:
            return self.temp.open(os.O_RDWR)
        fd = self.temp.open(os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self.created = True
        os.ftruncate(fd, self.op.version.size)
        return fd

    def resume(self, manifest: Manifest) -> set[int]:
        """Offsets of the chunks that an interrupted attempt at this very version (same
        path and version, so the same temp name) already wrote: each is re-read and
        kept only if its hash matches. A temp of the wrong size or kind is removed."""
        try:
            fd = self.temp.open(os.O_RDONLY)
        except FileNotFoundError:
            return set()
        except OSError:  # a link of ours (links are staged under the same names)
            self.temp.unlink()
            return set()
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size != self.op.version.size:
                self.temp.unlink()
                return set()
            self.created = True
            return {ref.offset for ref in data_chunks(manifest) if _holds(fd, ref)}
        finally:
            os.close(fd)


class _Prepared(NamedTuple):
    """What sizing a window found out about one of its files, for staging it: its temp
    file's name, whether that exists (an earlier attempt's), its chunks not all zero."""

    temp: str
    found: bool
    data: list[ChunkRef] | None


def _holds(fd: int, ref: ChunkRef) -> bool:
    """Whether the file ``fd`` holds the chunk ``ref`` at its offset."""
    return blake3(os.pread(fd, ref.length, ref.offset)).digest() == ref.hash


@functools.lru_cache(maxsize=4096)  # (small files' last chunks: one length each)
def _zero_hash(length: int) -> bytes:
    return blake3(bytes(length)).digest()


def data_chunks(manifest: Manifest) -> list[ChunkRef]:
    """The chunks that are not all zero. An all-zero chunk is never written nor fetched:
    the temp file's hole reads as it (so sparse files stay sparse). FastCDC cuts a run
    of zeros into MAX_CHUNK pieces (its rolling hash never matches over zeros), so only
    those and the file's last chunk are compared with a hash of zeros: one hash per
    length, where comparing every chunk hashed a buffer of zeros per chunk length
    (nearly every chunk has its own). Any other chunk is taken as data: written, never
    wrong."""
    chunks = manifest.chunks
    last = len(chunks) - 1
    return [
        ref
        for index, ref in enumerate(chunks)
        if not ((ref.length == MAX_CHUNK or index == last) and ref.hash == _zero_hash(ref.length))
    ]


class _Dropped(Exception):
    """(writer thread) The file was dropped from the window: its write is skipped."""


_Place = tuple[_Staged, int, "bytes | memoryview"]  # a chunk's bytes and where they go


class _Lane:
    """One writer thread and the temp files it keeps open while their chunks arrive.
    Every chunk of a file goes to the same lane, in order; files are spread over
    WRITER_THREADS lanes because creating a file is the slow step of a first sync of
    small files (a few hundred µs each on this kind of disk, most of it waiting), and
    the kernel creates files in different threads at once."""

    __slots__ = ("executor", "open", "unflushed")

    def __init__(self, index: int) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"backer-write-{index}")
        self.open: dict[InShare, int] = {}  # a few temp files, least recently used first
        self.unflushed: dict[InShare, int] = {}  # bytes written since writeback began

    def fd(self, staged: _Staged) -> int:
        """(this lane's thread) The open descriptor of ``staged``'s temp file."""
        fd = self.open.get(staged.temp)
        if fd is None:
            if len(self.open) >= OPEN_TEMP_FILES // WRITER_THREADS:
                self.forget(next(iter(self.open)))
            fd = self.open[staged.temp] = staged.open()
        return fd

    def forget(self, temp: InShare) -> None:
        """Close ``temp``'s descriptor, if this lane holds one."""
        fd = self.open.pop(temp, None)
        self.unflushed.pop(temp, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Stop the thread (a write under way ends, those queued are dropped), then
        close every descriptor it held."""
        self.executor.shutdown(wait=True, cancel_futures=True)
        for temp in list(self.open):
            self.forget(temp)


@dataclass
class _Writes:
    """Received chunks queued for one writer thread: where they go, their bytes."""

    future: Future[list[Exception | None]]
    places: list[_Place]
    size: int


def _remove_temp(temp: InShare) -> None:
    """Remove a temp file of a window given up; if the disk fails that too, the temp
    stays for the next scan's sweep: the fault that stopped the window is what is
    reported, never an exception out of the clean-up (seed 11177)."""
    with contextlib.suppress(OSError):
        temp.remove()


class Assembly:
    """One plan being applied: temp files waiting for chunks from peers.

    Each received chunk (verified by its hash before it gets here) is written straight to
    every offset of every file that needs it — one write per byte, no staging area —
    and the files are moved into place by :meth:`finish`, in plan order, in batches
    made durable together. A crash leaves only temp files, removed by the next scan.
    """

    def __init__(
        self,
        materializer: Materializer,
        operations: list[Operation],
        wake: Callable[[], None] | None = None,
    ) -> None:
        self.materializer = materializer
        self.operations = operations
        self.report = Report()
        self.staged: dict[str, _Staged] = {}
        self.missing: dict[bytes, int] = {}  # chunk hash -> length, in plan order
        self._places: dict[bytes, list[tuple[_Staged, int]]] = {}
        self._batch: list[_Staged] = []  # complete files on their way into place
        self.waiting = 0  # staged files still missing chunks (progress)
        self.short_of_room = 0  # bytes more the files left out for lack of room need
        self._mtimes = _directory_mtimes(materializer.dirs, operations)  # before the window
        self._checks: dict[str, Future[bool]] = {}  # large files being checked, by path
        self._checker: ThreadPoolExecutor | None = None  # (one thread, while it has work)
        self._lanes: list[_Lane] = []  # write received chunks (made at the first batch)
        self._gathered: list[_Place] = []  # chunks for the writer's next batch
        self._gathered_bytes = 0
        self._writes: deque[_Writes] = deque()  # batches queued for the writer, oldest first
        self._queued = 0  # bytes of chunk data in _writes
        self._copies: dict[str, Future[_Copied]] = {}  # local copies not yet settled, by path
        self._copier: ThreadPoolExecutor | None = None  # (COPY_THREADS threads)
        self._stop = threading.Event()  # tells a running copy to end (abort)
        self.wake = wake  # called from a worker thread when a copy or check ends

    def copy_later(self, staged: _Staged, fd: int, runs: list[Run]) -> None:
        """Copy ``runs`` into ``staged``'s temp file ``fd`` (which the copy closes) in the
        copier thread, off the event loop: chunks from peers are asked for and written
        meanwhile, and :meth:`settle` takes the outcome."""
        if self._copier is None:
            self._copier = ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="backer-copy")
        store = self.materializer.store
        future = self._copier.submit(_copy_local, store, fd, runs, self._stop)
        self._copies[staged.op.path] = future
        self._notify(future)

    def _notify(self, future: Future[Any]) -> None:
        if self.wake is not None:
            wake = self.wake
            future.add_done_callback(lambda _: wake())

    def copying(self) -> int:
        """How many staged files that miss no chunk from a peer still wait for their
        local copy (it runs, or :meth:`settle` has not taken it in): not complete yet."""
        staged = (self.staged.get(path) for path in self._copies)
        return sum(1 for s in staged if s is not None and s.missing == 0)

    def ready(self) -> bool:
        """Whether no local copy or early check is still running."""
        return all(f.done() for f in (*self._copies.values(), *self._checks.values()))

    def settle(self, wait: bool) -> dict[bytes, int] | None:
        """Take in the ended local copies: None while one still runs (unless ``wait``),
        else the chunks (hash -> length) that no local place held after all (a stale
        source's chunk is looked for elsewhere first, re-hashed), now awaited from the
        peers. A copy that failed drops its file (reported)."""
        if not wait and not self.ready():
            return None
        found: dict[bytes, int] = {}
        with self.stopping_when_full():
            for path, future in list(self._copies.items()):
                del self._copies[path]
                staged = self.staged.get(path)
                if staged is None:
                    continue  # that file already failed
                with _reported(path, self.report), self._dropping(staged):
                    copied = future.result()
                if path not in self.staged:
                    continue
                staged.checked.update(copied.verified)
                for ref in copied.stale:
                    if path not in self.staged:
                        break
                    with _reported(path, self.report), self._dropping(staged):
                        if self._found_elsewhere(staged, ref):
                            continue
                        if ref.hash not in self.missing:
                            found[ref.hash] = ref.length
                        self.wait_for(ref.hash, ref.length, staged, ref.offset)
        return found

    def _found_elsewhere(self, staged: _Staged, ref: ChunkRef) -> bool:
        """Write ``ref`` from another local place that still holds it, if one does."""
        data = self.materializer.store.read(ref.hash)
        if data is None or len(data) != ref.length:
            return False
        fd = staged.open()
        try:
            write_all(fd, data, ref.offset)
        finally:
            os.close(fd)
        staged.checked.add(ref.offset)
        return True

    def wait_for(self, chunk_hash: bytes, length: int, staged: _Staged, offset: int) -> None:
        self.missing.setdefault(chunk_hash, length)
        self._places.setdefault(chunk_hash, []).append((staged, offset))
        self.waiting += staged.missing == 0
        staged.missing += 1

    def place(self, chunk_hash: bytes, data: bytes | memoryview) -> None:
        """Have a verified chunk written wherever the plan needs it, by the writer
        thread (``pwrite`` waits for the disk, which the event loop must not: it reads
        the next chunks meanwhile), in batches of ``WRITE_BATCH`` bytes (a hand-over
        per chunk cost more than its write). A chunk counts once written
        (:meth:`_collect`); ``data`` must not change while it is held (the channel
        decrypts into its buffer again only once no view of it is left). At most
        ``WRITE_QUEUE`` bytes wait: then the loop waits for the disk."""
        places = self._places.pop(chunk_hash, [])
        self.missing.pop(chunk_hash, None)
        self._gathered.extend((staged, offset, data) for staged, offset in places)
        self._gathered_bytes += len(data) if places else 0
        if self._gathered_bytes >= WRITE_BATCH or not self.missing:
            self._submit(last=not self.missing)
        self._collect(self._queued > WRITE_QUEUE)

    def _submit(self, last: bool = False) -> None:
        """Hand the gathered writes to the writer threads, each file's to its lane
        (:meth:`_lane_index`); the ``last`` of the window wakes the loop once written, so
        that its files are complete at once (:meth:`commit_complete`), not when the
        window ends."""
        if not self._gathered:
            return
        if not self._lanes:
            self._lanes = [_Lane(index) for index in range(WRITER_THREADS)]
        by_lane: dict[int, list[_Place]] = {}
        for place in self._gathered:
            by_lane.setdefault(self._lane_index(place[0]), []).append(place)
        for index, places in by_lane.items():
            lane = self._lanes[index]
            future = lane.executor.submit(self._write, lane, places)
            if last:
                self._notify(future)
            size = sum(len(data) for _, _, data in places)
            self._writes.append(_Writes(future, places, size))
            self._queued += size
        self._gathered, self._gathered_bytes = [], 0

    def _write(self, lane: _Lane, places: list[_Place]) -> list[Exception | None]:
        """(a writer thread) Write each chunk at its place; start the writeback of every
        ``WRITEBACK_BYTES`` written to a file, so that its fsync at the end finds its
        pages mostly on disk already (``sync_file_range``: no durability of its own).
        Each place's failure is returned, to be raised on the event loop."""
        outcome: list[Exception | None] = []
        for staged, offset, data in places:
            try:
                if staged.op.path not in self.staged:
                    raise _Dropped
                fd = lane.fd(staged)
                write_all(fd, data, offset)
                written = lane.unflushed.get(staged.temp, 0) + len(data)
                if written >= WRITEBACK_BYTES:
                    start_writeback(fd, 0, 0)
                    written = 0
                lane.unflushed[staged.temp] = written
                outcome.append(None)
            except Exception as exc:
                outcome.append(exc)
        return outcome

    @staticmethod
    def _lane_index(staged: _Staged) -> int:
        """The lane that writes every chunk of ``staged`` (so its writes stay in order
        and its descriptor in one thread): by its temp file's random name."""
        return hash(staged.temp.name) % WRITER_THREADS

    def _collect(self, wait: bool = False) -> None:
        """Count the chunks the writer has written (all, with ``wait``; else the done
        ones, and the oldest until at most ``WRITE_QUEUE`` bytes wait); a file complete
        is checked early. A write that failed is raised here, as it would have been
        where it was made: its file is dropped (a full disk stops the window)."""
        if wait:
            self._submit()
        if not self._collectable(wait):
            return  # (most arrivals: no context entered)
        with self.stopping_when_full():
            while self._collectable(wait):
                writes = self._writes.popleft()
                self._queued -= writes.size
                outcome = writes.future.result()
                if any(error is not None for error in outcome):
                    self._wait_writes()  # the writer idle: _dropping may close its fds
                for (staged, _, _), error in zip(writes.places, outcome, strict=True):
                    if staged.op.path not in self.staged or isinstance(error, _Dropped):
                        continue  # that file already failed
                    if error is not None:  # (no context managers per chunk written)
                        with _reported(staged.op.path, self.report), self._dropping(staged):
                            raise error
                        continue
                    staged.missing -= 1
                    self.waiting -= staged.missing == 0
                    if staged.missing == 0:
                        self._check_early(staged)

    def _collectable(self, wait: bool) -> bool:
        """Whether :meth:`_collect` has a batch to take now."""
        return bool(self._writes) and (
            wait or self._queued > WRITE_QUEUE or self._writes[0].future.done()
        )

    def _wait_writes(self) -> None:
        """Wait until the writer has done every write queued (their outcomes are kept)."""
        for writes in self._writes:
            with contextlib.suppress(Exception):
                writes.future.result()

    def _stop_writer(self) -> None:
        """Stop the writer threads (a write under way ends, those queued are dropped)
        and close the temp files they held open."""
        for lane in self._lanes:
            lane.close()
        self._lanes = []
        self._writes.clear()
        self._queued = 0
        self._gathered, self._gathered_bytes = [], 0

    def _check_early(self, staged: _Staged) -> None:
        """A large file has all its chunks: verify and flush it in the worker thread
        now, overlapping the transfer of the rest (see :func:`_check_and_flush`)."""
        version = staged.op.version
        if version.kind != Kind.FILE or version.size < CHECK_EARLY:
            return
        manifest = self.materializer.catalog.manifest(version.content)
        if manifest is None:
            return  # (reported by the commit)
        if self._checker is None:
            self._checker = ThreadPoolExecutor(1, thread_name_prefix="backer-check")
        checked = frozenset(staged.checked)
        copy = self._copies.get(staged.op.path)
        future = self._checker.submit(_check_and_flush, staged.temp, manifest, checked, copy)
        self._checks[staged.op.path] = future
        self._notify(future)

    def _checked(self, staged: _Staged, manifest: Manifest) -> Container[int]:
        """The offsets of ``staged`` already verified: all of them once its early check
        passed (its failure is raised here, as the commit's own check would)."""
        early = self._checks.pop(staged.op.path, None)
        if early is None or not early.result():
            return staged.checked
        return {ref.offset for ref in manifest.chunks}

    def _stop_checks(self) -> None:
        """Stop the local copies between two pieces and wait for the worker threads to
        end (a copy or check not started is dropped): nothing writes into a temp file
        after this."""
        self._stop.set()
        for pool in (self._copier, self._checker):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._copier = self._checker = None
        self._copies.clear()
        self._checks.clear()

    @contextlib.contextmanager
    def _dropping(self, staged: _Staged) -> Iterator[None]:
        """A file whose write fails is dropped from the plan, its temp file removed."""
        try:
            yield
        except BaseException:
            self.staged.pop(staged.op.path, None)
            self.waiting -= staged.missing > 0
            if self._lanes:
                self._lanes[self._lane_index(staged)].forget(staged.temp)
            _remove_temp(staged.temp)
            raise

    @contextlib.contextmanager
    def stopping_when_full(self) -> Iterator[None]:
        """Turn a full disk into :class:`DiskFull`, after removing every temp file of the
        window: nothing half-made stays, and the room they took is free again."""
        try:
            yield
        except (_OutOfSpace, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno not in NO_SPACE:
                raise
            self.abort()
            written = set(self.report.written)
            needed = SPACE_RESERVE + sum(
                op.version.size
                for op in self.operations
                if op.version.kind == Kind.FILE and op.path not in written
            )
            root = self.materializer.root
            raise DiskFull(root, needed - _free_bytes(root)) from exc

    def abort(self) -> None:
        """Give up the window: every temp file of it is removed."""
        self._stop_writer()
        self._stop_checks()
        for staged in [*self.staged.values(), *self._batch]:
            _remove_temp(staged.temp)
        self.staged.clear()
        self._batch = []
        self.materializer.relock(self.report)
        self.materializer.unmake_unused()
        self.materializer.dirs.close()
        self._places.clear()
        self.missing.clear()

    def finish(self) -> Report:
        """Move every complete file into place (plan order, durable batches), report the
        ones whose chunks never came, then apply the deletions."""
        try:
            with self.stopping_when_full():
                return self._finish()
        finally:
            self._stop_checks()
            self.materializer.relock(self.report)
            self.materializer.unmake_unused()
            self.materializer.dirs.close()

    def _finish(self) -> Report:
        self.settle(wait=True)  # (chunks it finds missing now are reported, not fetched)
        self._collect(wait=True)
        self._stop_writer()
        report, materializer = self.report, self.materializer
        local = materializer.catalog.local_entries(op.path for op in self.operations)
        ignored = ignored_now(materializer.root, self.operations, local)
        batch = self._batch = []
        batch_bytes = 0
        deletions: list[Operation] = []  # (last in every plan: after the writes)
        for op in self.operations:
            if op.version.kind == Kind.DIRECTORY:
                continue
            if op.path in ignored:  # left alone, as a plan made now would leave it
                staged = self.staged.pop(op.path, None)
                if staged is not None:  # stale now: the sweep after the plan removes it
                    report.kept_temps.append(staged.temp.path)
                continue
            if op.version.kind == Kind.DELETED:
                deletions.append(op)
                continue
            if len(batch) >= STAGE_FILES or batch_bytes >= STAGE_BYTES:
                materializer._commit(batch, report)
                batch.clear()
                batch_bytes = 0
            staged = self.staged.pop(op.path, None)
            if staged is None:
                continue  # already reported, or moved into place early (commit_complete)
            if staged.missing:  # every connected device lacked them (see docs/decisions.md)
                report.errors.append(Problem(op.path, unavailable(staged.missing)))
                _remove_temp(staged.temp)
                continue
            if self._sealed(staged, local.get(op.path)):
                batch.append(staged)
                batch_bytes += op.version.size
        materializer._commit(batch, report)
        deleted_from: set[str] = set()
        materializer._delete_all(deletions, local, report, deleted_from)
        materializer.unmake_emptied(deleted_from)
        for directory in sorted(deleted_from, reverse=True):
            _fsync_dir_reported(materializer.dirs, directory, report)
        self._keep_directory_times()
        self._keep_written()
        return report

    def _sealed(self, staged: _Staged, cached: LocalEntry | None) -> bool:
        """Ready a complete temp file (taken out of :attr:`staged`) for its commit: the
        version is still the one to write here and the bytes are verified (:func:`seal`).
        False, its temp removed, when not (reported)."""
        op, report = staged.op, self.report
        with _reported(op.path, report), _removing(staged.temp):
            # A scan may have recorded a version here since the window began: if its
            # file is gone now, writing would paper over the person's deletion.
            staged.cached = cached
            op.still_planned(cached)
            if op.version.kind == Kind.FILE:
                manifest = self.materializer.catalog.manifest(op.version.content)
                if manifest is None:
                    raise ValueError("manifest is missing")
                seal(staged.temp, manifest, op.version, self._checked(staged, manifest))
            elif op.version.mtime_ns:  # a link's own time (never its target's)
                mtime = op.version.mtime_ns
                staged.temp.utime_ns((mtime, mtime))
            return True
        return False

    def commit_complete(self) -> bool:
        """Move into place now each large file whose early check has passed (all its
        chunks written, verified and flushed), while the rest of the window is copied or
        fetched: its commit (the replaced file kept, the records written) then overlaps
        that work, where at :meth:`finish` the files were committed one after another
        once the last had arrived. Each is committed as :meth:`finish` commits a batch,
        checked against the disk and this device's rules first. Whether any was (the
        caller commits the transaction)."""
        self._collect()
        done = [
            path
            for path, check in self._checks.items()
            if check.done() and check.exception() is None and check.result()
        ]
        materializer, committed = self.materializer, False
        for path in done:
            staged = self.staged.get(path)
            if staged is None or staged.missing:
                continue
            local = materializer.catalog.local_entries([path])
            if ignored_now(materializer.root, [staged.op], local):
                continue  # (left to finish, which leaves it alone)
            del self.staged[path]
            with self.stopping_when_full():
                if self._sealed(staged, local.get(path)):
                    self._batch = [staged]
                    materializer._commit(self._batch, self.report)
                    self._batch = []
            committed = True
        return committed

    def _keep_written(self) -> None:
        """Each file written is kept in the content store by a hard link (best effort),
        so that a later edit or deletion on this device still leaves its bytes here.
        After the deletions: a file that replaced identical bytes (a rename, a version
        with the same content) then takes over the store's entry, one copy, not two."""
        written = self.materializer.catalog.local_entries(self.report.written)
        self.materializer.kept.keep_files(
            (op.path, op.version.content, op.version.size, written[op.path].inode)
            for op in self.operations
            if op.version.kind == Kind.FILE
            and op.path in written
            and written[op.path].version_id == op.version_id
        )

    def _keep_directory_times(self) -> None:
        """Once the window has written into its directories, give each its mtime: a
        directory version applied in this window gets the writer's, any other the one
        recorded here — unless the person changed the directory meanwhile (its mtime
        before the window was not the recorded one): the next scan sees that."""
        materializer, report = self.materializer, self.report
        applied = {op.path: op for op in self.operations if op.version.kind == Kind.DIRECTORY}
        local = materializer.catalog.local_entries(self._mtimes)
        now_ns, entries = entropy.now_ns(), []
        for path, before in sorted(self._mtimes.items()):
            cached = local.get(path)
            if cached is None or not stat.S_ISDIR(cached.mode):
                continue
            op = applied.get(path)
            if op is not None and op.version_id == cached.version_id:
                wanted = op.version.mtime_ns
            elif before == cached.mtime_ns:
                wanted = cached.mtime_ns
            else:
                continue
            target = InShare.of(materializer.dirs, path)
            # (a directory of another owner keeps its time: not a problem of its entries)
            with (
                _reported(path, report),
                contextlib.suppress(FileNotFoundError, PermissionError, NotADirectory),
            ):
                info = target.lstat()
                if not stat.S_ISDIR(info.st_mode) or info.st_ino != cached.inode or not wanted:
                    continue
                if info.st_mtime_ns != wanted:
                    target.utime_ns((info.st_atime_ns, wanted))
                    info = target.lstat()
                entries.append(cache_entry(path, cached.version_id, stat_key_of(info), now_ns))
        materializer.catalog.set_local(entries)


def ignored_now(root: Path, operations: list[Operation], local: dict[str, LocalEntry]) -> set[str]:
    """The paths of ``operations`` that this device's rules ignore now. A plan waits for
    chunks (and its window for its turn) while the person may add a rule: from then on
    the path is theirs alone, never written nor deleted, whatever the plan saw."""
    rules = IgnoreRules.load(root)
    if rules.spec is None:
        return set()

    def is_dir(op: Operation) -> bool:
        cached = local.get(op.path)
        if op.version.kind == Kind.DELETED:
            return cached is not None and stat.S_ISDIR(cached.mode)
        return op.version.kind == Kind.DIRECTORY

    return {op.path for op in operations if rules.excluded(op.path, is_dir(op))}


def _directory_mtimes(dirs: Directories, operations: list[Operation]) -> dict[str, int | None]:
    """The mtime of every directory a window writes into or applies, before it starts
    (every ancestor: a missing parent made on the way changes the one above it). Each
    ancestor is named once, however many paths share it, and looked up in its parent,
    parents first (each folder opened from the one above: joining every ancestor of
    every path, each looked up from the root, cost O(depth³) for a deep tree)."""
    ancestors: set[str] = set()
    for op in operations:
        above = op.path.rpartition("/")[0]
        while above and above not in ancestors:
            ancestors.add(above)
            above = above.rpartition("/")[0]
    ancestors.update(op.path for op in operations if op.version.kind == Kind.DIRECTORY)
    mtimes: dict[str, int | None] = {}
    for path in sorted(ancestors):
        parent = path.rpartition("/")[0]
        if parent and mtimes[parent] is None:  # (nor is anything in it)
            mtimes[path] = None
            continue
        try:
            mtimes[path] = InShare.of(dirs, path).lstat().st_mtime_ns
        except OSError:  # not there yet (made by this window) or not reachable
            mtimes[path] = None
    return mtimes


STAGE_FILES = 1000
STAGE_BYTES = 256 * 1024 * 1024
SYNCFS_BELOW_AVERAGE = 1024 * 1024  # average file size under which one syncfs is cheaper
OPEN_TEMP_FILES = 64
WRITER_THREADS = 4  # received chunks are written by this many threads, each file by one
COPY_THREADS = 2  # local copies at once: two streams of durable writes kept this
# machine's disk busier than one (1 GiB fsync'd: 1.06 s on two threads, 1.20-1.43 s on one)
WRITE_QUEUE = 32 * 1024 * 1024  # received bytes that may wait for the writer thread
WRITE_BATCH = 4 * 1024 * 1024  # received bytes handed to the writer thread at a time
WRITEBACK_BYTES = 8 * 1024 * 1024  # a temp file's writeback is started after each such run
CHECK_EARLY = 16 * 1024 * 1024  # files at least this large are checked and flushed once
# complete, off the event loop (smaller ones: one syncfs at the commit is cheaper)


class Materializer:
    """Applies a plan to one share's directory; never writes outside it."""

    def __init__(self, root: Path, catalog: Catalog, store: ChunkStore) -> None:
        self.root = root
        self.catalog = catalog
        self.store = store
        self.kept = Store(root, catalog)
        # every change is made relative to a parent opened with no link followed
        # (backer.fs.dirs); closed at the end of each window, so each checks afresh
        self.dirs = Directories(root)
        self.spellings = Spellings(root)
        self._settled: dict[str, Identity] | None = None  # folders found in place, per batch
        self._unlocked: dict[str, int] = {}  # read-only directories opened while applying
        self._writable: set[str] = set()  # directories found writable (asked once a window)
        self._made: list[str] = []  # missing parents made for this window's entries
        self._recorded: list[LocalEntry] | None = None  # while a batch is moved into place
        self._path_max = _path_max(root)
        self._root_bytes = len(os.fsencode(root)) + 1  # (with the separator)
        self._grown: set[str] = set()  # directories a new directory was made in (fsync)
        self._prepared: dict[str, _Prepared] = {}  # by path, from _room_needed to _stage
        self._indexed: dict[bytes, list[tuple[str, int, int]]] = {}  # (_index_new_files)

    def start(
        self, operations: list[Operation], wake: Callable[[], None] | None = None
    ) -> Assembly:
        """Begin applying a plan: directories are made now (files need them); every file
        and link gets its temp file beside its target, to be filled with the chunks any
        local file holds in a worker thread (``wake`` is called from it as each copy
        ends, see :meth:`Assembly.settle`); what is still missing arrives through
        :meth:`Assembly.place`, and :meth:`Assembly.finish` moves everything into place."""
        assembly = Assembly(self, operations, wake)
        local = self.catalog.local_entries(op.path for op in operations)
        ignored = ignored_now(self.root, operations, local)
        operations = self._fitting([op for op in operations if op.path not in ignored], assembly)
        self._index_new_files(operations, local)
        self.dirs.close()
        self.spellings.forget()
        try:
            with assembly.stopping_when_full():  # (the folders' fsync too: it can meet it)
                try:
                    for op in operations:
                        if op.version.kind == Kind.DELETED:
                            continue
                        with _reported(op.path, assembly.report, op.version_id):
                            check(op.path)
                            cached = local.get(op.path)
                            op.still_planned(cached)
                            if op.version.kind == Kind.DIRECTORY:
                                self._make_directory(op, cached)
                            else:
                                staged = self._stage(op, cached, assembly)
                                assembly.staged[op.path] = staged
                                if staged.missing == 0:
                                    assembly._check_early(staged)
                finally:
                    self._flush_grown(assembly.report)
        finally:
            self._prepared.clear()
            self._indexed = {}
        return assembly

    def _index_new_files(self, operations: list[Operation], local: dict[str, LocalEntry]) -> None:
        """Look up in the chunk index, at once, where the chunks of the window's files
        that replace nothing here are (:meth:`_stage` copies them from there): a first
        sync's window of 5,000 small files asked once per file. A file that replaces
        one is looked up on its own, after the chunks the replaced file holds."""
        self._indexed = self.catalog.chunk_locations_of(
            ref.hash
            for op in operations
            if op.path not in local
            and (prepared := self._prepared.get(op.path)) is not None
            and prepared.data is not None
            for ref in prepared.data
        )

    def _flush_grown(self, report: Report) -> None:
        """fsync each directory a new directory was made in, once for the window (a first
        sync makes a thousand directories in one): before the caller commits their records,
        and before any file is renamed into them."""
        grown, self._grown = self._grown, set()
        for directory in sorted(grown):
            _fsync_dir_reported(self.dirs, directory, report)

    def _room_needed(self, op: Operation) -> int:
        """Bytes the temp file of ``op`` will take (the temp holds a whole new copy; the
        replaced one is kept): its chunks that are not all zero (holes), less what the
        temp of an interrupted attempt already holds."""
        if op.version.kind != Kind.FILE:
            return 0
        manifest = self.catalog.manifest(op.version.content)
        size = op.version.size
        data = None
        if manifest is not None:
            data = data_chunks(manifest)
            size = sum(ref.length for ref in data)
        temp = temp_name(op.path, op.version_id)
        where = os.path.join(self.root, op.path.rpartition("/")[0], temp)  # (not pathlib:
        try:  # it cost more than the lstat, per file)
            size -= os.lstat(where).st_blocks * 512
            found = True
        except OSError:
            found = False
        self._prepared[op.path] = _Prepared(temp, found, data)
        return max(0, size)

    def _fitting(self, operations: list[Operation], assembly: Assembly) -> list[Operation]:
        """The operations whose files fit in the free space (less SPACE_RESERVE), in plan
        order. A file that does not fit is reported and left for a later plan, and the
        files after it still go on: one file too big for the disk must not stop all
        the others. What the skipped files lack is ``assembly.short_of_room``."""
        needs = [self._room_needed(op) for op in operations]
        if not any(needs):
            return operations
        room = _free_bytes(self.root) - SPACE_RESERVE
        fitting: list[Operation] = []
        skipped = 0
        for op, need in zip(operations, needs, strict=True):
            if need > room:
                skipped += need
                assembly.report.errors.append(Problem(op.path, LEFT_OUT))
                continue
            room -= need
            fitting.append(op)
        if skipped:
            assembly.short_of_room = skipped - max(0, room)
        return fitting

    def _target(self, path: str) -> InShare:
        """The entry at ``path``, its parent opened with no link followed (every
        change to it is then made relative to that directory: see backer.fs.dirs);
        a parent that is not a real directory is refused.

        A missing parent is created: an entry that is live needs its directories even
        if one of them was deleted concurrently elsewhere (the next scan records them,
        and a re-created directory beats its deletion like any modification).
        """
        if self._root_bytes + len(os.fsencode(path)) >= self._path_max:  # before any folder is made
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        other = self.spellings.other(path)
        if other is not None:  # the disk's own entry there is another path's: kept
            raise OSError(errno.EEXIST, f"not written: this filesystem ignores case: {other} "
                          "is here under another spelling")  # fmt: skip
        entry = InShare.of(self.dirs, path)

        def make(parent: str) -> bool:
            if self.catalog.local_entries([parent]):  # gone since the last scan: a
                raise LocalEdit(path)  # deletion the scanner must record first
            self._made.append(parent)
            self.spellings.made(parent)
            return True

        try:
            self.dirs.open(entry.parent, make)
        except NotADirectory:
            raise LocalEdit(path) from None
        self._unlock(entry.parent)
        return entry

    def _unlock(self, directory: str) -> None:
        """Make a read-only directory of ours writable (u+w) while entries are put into
        or taken out of it; :meth:`relock` gives it back its mode at the end."""
        if directory in self._unlocked or directory in self._writable:
            return
        with self.dirs.at(directory) as fd:
            if os.access(".", os.W_OK, dir_fd=fd):
                self._writable.add(directory)
                return
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            os.fchmod(fd, mode | stat.S_IWUSR | stat.S_IXUSR)
        self._unlocked[directory] = mode

    def unmake_unused(self) -> None:
        """Remove the missing parents made for this window that hold nothing (what they
        were made for was not written): left there, the next scan would record them as
        new directories and bring back a directory deleted elsewhere. One that a scan
        recorded meanwhile stays: removed, it would be a deletion nobody made."""
        recorded = self.catalog.local_entries(self._made)
        for directory in reversed(self._made):
            if directory in recorded:
                continue
            with contextlib.suppress(OSError):  # not empty: it is used
                InShare.of(self.dirs, directory).rmdir()
        self._made.clear()

    def unmake_emptied(self, directories: set[str]) -> None:
        """Remove the directories that deletions left empty where no device wants one:
        never recorded here and with no live version (a missing parent made earlier for
        a file since deleted). Left there, the next scan would record each as a new
        directory and bring back one deleted everywhere (a conflict copy was written
        into a folder this device had deleted, then the copy was deleted). Their
        parents, emptied in turn, are looked at too; ``directories`` gets them (fsync)."""
        pending = sorted(directories, key=lambda d: d.count("/") + bool(d))
        while pending:
            path = pending.pop()
            if not path:  # (the share's root)
                continue
            if path in self.catalog.local_entries([path]):
                continue
            live = self.catalog.live_for([path]).get(path, {})
            if any(v.kind != Kind.DELETED for v in live.values()):
                continue
            entry = InShare.of(self.dirs, path)
            try:
                entry.rmdir()  # only if empty: what is in it is someone's
            except OSError:
                continue
            directories.discard(path)
            directories.add(entry.parent)
            pending.append(entry.parent)

    def relock(self, report: Report) -> None:
        """Give every directory :meth:`_unlock` opened its mode back."""
        for directory, mode in sorted(self._unlocked.items(), reverse=True):
            with (
                _reported(directory or ".", report),
                contextlib.suppress(FileNotFoundError, NotADirectory),
                self.dirs.at(directory) as fd,
            ):
                os.fchmod(fd, mode)
        self._unlocked.clear()
        self._writable.clear()

    def _unchanged(self, target: InShare, cached: LocalEntry | None) -> os.stat_result | None:
        """The target's stat if it is exactly as last recorded; raise LocalEdit if not,
        or if its folder is no longer where its path says (moved or swapped for a link
        since the window opened it: what is in it now is not what the plan saw there);
        :class:`MountedHere` if it is a mount point (a file bound onto: never ours)."""
        if self.dirs.moved(target.parent, self._settled):
            raise LocalEdit(str(target.path))
        try:
            info = target.lstat()
        except FileNotFoundError:
            if cached is None:
                return None
            raise LocalEdit(str(target.path)) from None
        self.dirs.refuse_mount_point(target.relative, info)  # (the scan skips it: R69)
        if cached is None or entry_key(stat_key_of(info)) != entry_key(cached.stat_key):
            raise LocalEdit(str(target.path))
        if not stat.S_ISDIR(info.st_mode) and not self.dirs.at_its_path(target.parent):
            raise LocalEdit(str(target.path))  # its folder was renamed since the batch
        return info  # found it: the file is the person's there now (R44)

    def _preserve(
        self, target: InShare, path: str, info: os.stat_result, cached: LocalEntry
    ) -> bytes | None:
        """Keep a replaced or deleted file's bytes in the content store (a hard link,
        see :mod:`backer.versioner.store`); its chunks stay readable there (a later write
        in the same plan may need them). A link's target stays in its recorded version
        and a directory holds no bytes: nothing to keep. A file the scan cache does not
        tie to a recorded file version is hashed to find its content id. Returns the
        content id kept, for :meth:`Store.rejoin` once the file is gone.

        A file that no longer holds its recorded bytes under its recorded stat (rewritten
        in place, its time put back or within the filesystem's step; only a copy, where
        there are no hard links, hashes it) is the person's edit that no scan would see:
        every window failed on it and the peer's version never landed (R72). Its scan
        cache entry is unsettled and a scan of it asked for, which records its bytes as
        this device's version (a conflict with the peer's); the window leaves it."""
        if not stat.S_ISREG(info.st_mode):
            return None
        version = self.catalog.version(cached.version_id)
        if version is not None and version.kind == Kind.FILE:
            content = version.content
        else:
            content = manifest_of_file(target.path, info.st_size).id
        try:
            self.kept.keep(path, content, info.st_size, retiring=True, source=target)
        except OSError as exc:
            if exc.errno != errno.ESTALE:
                raise
            self.catalog.set_local([cached._replace(settled=False)])
            self.store.stale(path)
            raise LocalEdit(path) from exc
        self.kept.retire(path, content)
        return content

    def _delete_all(
        self,
        operations: list[Operation],
        local: dict[str, LocalEntry],
        report: Report,
        touched: set[str],
    ) -> None:
        """Apply the deletions (deepest first) in batches of ``STAGE_FILES``, as the
        writes are: within one, a folder found in place is trusted to stay there (see
        :meth:`Directories.moved`), so going up a deep tree checks each folder once,
        not each from the share's root."""
        for first in range(0, len(operations), STAGE_FILES):
            self._settled = {}
            try:
                for op in operations[first : first + STAGE_FILES]:
                    with _reported(op.path, report):
                        check(op.path)
                        cached = local.get(op.path)
                        op.still_planned(cached)
                        self._delete(op, cached, report, touched)
            finally:
                self._settled = None

    def _delete(
        self, op: Operation, cached: LocalEntry | None, report: Report, touched: set[str]
    ) -> None:
        """Remove a recorded entry (its contents kept in the store); its directory goes
        into ``touched``, to be fsynced once for all deletions (a directory removed
        leaves it: nothing to fsync or to find empty there)."""
        target = self._target(op.path)
        info = self._unchanged(target, cached)
        if info is not None and stat.S_ISDIR(info.st_mode):
            try:
                target.rmdir()
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise LocalEdit(op.path) from exc
                raise
            touched.discard(op.path)
        elif info is not None:
            assert cached is not None  # (_unchanged: a found entry is the cached one)
            content = self._preserve(target, op.path, info, cached)
            target.unlink()
            if content is not None:
                self.kept.rejoin(content)
        touched.add(target.parent)
        self.catalog.drop_local([op.path])
        report.deleted.append(op.path)

    def _make_directory(self, op: Operation, cached: LocalEntry | None) -> None:
        target = self._target(op.path)
        try:
            found: os.stat_result | None = target.lstat()
        except FileNotFoundError:
            found = None
        if found is None and cached is not None:  # recorded here and gone: a deletion the
            raise LocalEdit(op.path)  # scanner has not recorded yet, never to be papered over
        if found is not None:
            self.dirs.refuse_mount_point(op.path, found)
        if found is not None and not stat.S_ISDIR(found.st_mode):
            self._unchanged(target, cached)  # a file or link we recorded: replace it
            assert cached is not None
            self._preserve(target, op.path, found, cached)
            target.unlink()
            found = None
        if found is None:
            target.mkdir()
            self.spellings.made(op.path)
            self._grown.add(target.parent)  # fsynced once for the window (_flush_grown)
        info = target.lstat()
        wanted = op.version.permissions  # exactly, 0o000 included (it is not "unset")
        if stat.S_IMODE(info.st_mode) & PERMISSION_BITS != wanted:
            target.chmod(wanted)
            info = target.lstat()
        self._record(op, info)

    def _stage(self, op: Operation, cached: LocalEntry | None, assembly: Assembly) -> _Staged:
        """A temp file (or link) beside the target; the chunks found locally are copied
        into it by the copier thread (:meth:`Assembly.copy_later`), the others awaited."""
        target = self._target(op.path)
        prepared = self._prepared.pop(op.path, None)
        name = prepared.temp if prepared else temp_name(op.path, op.version_id)
        temp = target.with_name(name)
        staged = _Staged(op, cached, temp, target)
        if op.version.kind == Kind.SYMLINK:
            temp.unlink(missing_ok=True)  # an interrupted attempt's (ours, by its name)
            temp.symlink(op.version.link_target)
            return staged
        manifest = self.catalog.manifest(op.version.content)
        if manifest is None or manifest.id != op.version.content:
            raise ValueError("manifest is missing or does not match the version")
        check_manifest(manifest, op.version.size)
        fd = None  # created with the first chunk to write: one open per file, not two
        try:
            if prepared is None or prepared.found:  # (an earlier attempt's temp)
                staged.checked = staged.resume(manifest)
            data = prepared.data if prepared is not None else None
            if data is None:
                data = data_chunks(manifest)
            wanted = [ref for ref in data if ref.offset not in staged.checked]
            if cached is None and prepared is not None and prepared.data is not None:
                runs = self.store.locate(wanted, None, self._indexed)
            else:
                runs = self.store.locate(wanted, self._replaced(cached))
            copied = {ref.offset for run in runs for ref in run.chunks}
            for ref in wanted:
                if ref.offset not in copied:
                    assembly.wait_for(ref.hash, ref.length, staged, ref.offset)
            if runs:
                assembly.copy_later(staged, staged.open(), runs)  # (which closes it)
            elif not staged.created and not staged.missing:  # nothing to write
                fd = staged.open()
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        finally:
            if fd is not None:
                os.close(fd)
        return staged

    def _replaced(self, cached: LocalEntry | None) -> tuple[str, Manifest] | None:
        """The file a write replaces, as its last scan recorded it (path, manifest): the
        first place to copy unchanged chunks from (:meth:`ChunkStore.locate`)."""
        if cached is None:
            return None
        version = self.catalog.version(cached.version_id)
        if version is None or version.kind != Kind.FILE:
            return None
        manifest = self.catalog.manifest(version.content)
        return None if manifest is None else (cached.path, manifest)

    def _commit(self, staged: list[_Staged], report: Report) -> None:
        """Make the staged temp files durable, then move each into place if its target is
        still exactly as the plan saw it; fsync each directory touched, once."""
        if not staged:
            return
        staged = _make_durable(self.root, staged, report)
        directories: set[str] = set()
        self._settled = {}  # (a folder checked once per batch)
        self._recorded = []  # scan-cache rows, written once for the batch, not per file
        manifests: list[tuple[str, Manifest]] = []  # (after any move of the old chunks')
        try:
            for item in staged:
                op, target = item.op, item.target
                with _reported(op.path, report):
                    with _removing(item.temp):
                        previous = self._unchanged(target, item.cached)
                        replaced = None
                        if previous is not None and stat.S_ISDIR(previous.st_mode):
                            try:  # a recorded directory gives way only once it is empty
                                target.rmdir()
                            except OSError as exc:
                                report.folders_in_the_way.append(op.path)
                                raise LocalEdit(op.path) from exc
                            previous = None
                        elif previous is not None:
                            assert item.cached is not None
                            replaced = self._preserve(target, op.path, previous, item.cached)
                        if previous is None:  # nothing there: nothing may be replaced
                            try:
                                item.temp.rename_new(target)
                            except FileExistsError:  # the person's, made since the look
                                raise LocalEdit(op.path) from None
                        else:
                            _replace_looked_at(item.temp, target, previous)
                        if replaced is not None:
                            self.kept.rejoin(replaced)
                    directories.add(target.parent)
                    self._record(op, target.lstat())
                    if op.version.kind == Kind.FILE:
                        manifest = self.catalog.manifest(op.version.content)
                        assert manifest is not None
                        manifests.append((op.path, manifest))
                        report.bytes_written += op.version.size
                    report.written.append(op.path)
        finally:  # what was moved into place is recorded, even when the disk filled up
            self._settled = None
            recorded, self._recorded = self._recorded, None
            self.catalog.set_local(recorded)
            self.catalog.put_manifests(manifests)
        for directory in sorted(directories):
            _fsync_dir_reported(self.dirs, directory, report)

    def _record(self, op: Operation, info: os.stat_result) -> None:
        """Put what was just written into the scan cache (kept for the batch's single
        write while :meth:`_commit` runs)."""
        entry = cache_entry(op.path, op.version_id, stat_key_of(info), entropy.now_ns())
        if self._recorded is not None:
            self._recorded.append(entry)
        else:
            self.catalog.set_local([entry])
