"""A share on disk: its metadata directory, journal, state and catalog, kept in step.

Data flow for a local change: the scanner reports what changed; :meth:`Share.commit`
turns it into versions, writes them to the CRDT in one transaction, appends the
update bytes as a signed journal event, then records the resulting delta in the
catalog. Start-up loads the last document snapshot and replays only the journal
events after it, so the catalog can always be rebuilt from the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import sqlite3
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Collection, Container, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeVar

import nacl.signing
import sqlite_utils
from blake3 import blake3

from backer.db import integrity, recovery
from backer.db.catalog import (
    Catalog,
    LocalEntry,
    Problem,
    read_local,
    read_local_after,
    read_local_names,
    scratch_in_memory,
)
from backer.errors import BackerError
from backer.fs.dirs import open_directory
from backer.fs.mounts import share_disk
from backer.fs.paths import METADATA_DIR, is_valid
from backer.fs.placeholders import remove_left
from backer.memory import trim_heap
from backer.model import entropy, membership
from backer.model.materializer import (
    Report,
    conflict_path,
    copy_version_id,
    discard_temp,
    is_copy_of,
    resolve,
    resolve_moot_copies,
    resolve_shadowed,
    stale_temps,
)
from backer.model.membership import (
    INVITE_ID_BYTES,
    MAX_DEVICE_NAME,
    NO_INVITE,
    SHARE_ID_BYTES,
    EventKind,
    Members,
    checked_name,
    genesis_payload,
    host_name,
    invite_payload,
    key_payload,
    member_payload,
    open_key,
    parse_invite,
    remove_payload,
    rename_payload,
)
from backer.model.records import (
    CONTENT_ID_BYTES,
    MAX_TIME_MS,
    Kind,
    Version,
    new_version_id,
    split_key,
)
from backer.model.state import (
    CLIENT_NONCE_BYTES,
    BadUpdate,
    Delta,
    FileState,
    derive_client,
    parse_update,
)
from backer.scanner.content import Manifest
from backer.scanner.ignore import CONFLICT_MARK, IgnoreRules
from backer.scanner.walk import (
    Observation,
    Seen,
    cache_entry,
    classify,
    look,
    permissions_of,
    stat_key_of,
    under_any,
)
from backer.versioner.store import Store, remove_spares
from journal import (
    Checkpoint,
    CorruptJournal,
    Event,
    IngestResult,
    Journal,
    JournalError,
    RejectedBatch,
)
from journal.event import MAX_PAYLOAD

if TYPE_CHECKING:
    from backer.progress import ProgressCallback

DB_FILE = "backer.db"
LOCK_FILE = "lock"
RESOLUTIONS_PER_EVENT = 2000  # ~160 bytes each: one event stays far below a frame
MAX_RESOLUTION_ROUNDS = 50  # copies of one device's same-second losers collide in a chain
UNHELD_PER_EVENT = 2000  # content ids per UNHELD event: 64 KB, far below a frame
_PAYLOAD_BYTES = {
    EventKind.GENESIS: (SHARE_ID_BYTES, SHARE_ID_BYTES + MAX_DEVICE_NAME),
    EventKind.MEMBER_ADD: (32 + INVITE_ID_BYTES, 32 + INVITE_ID_BYTES + MAX_DEVICE_NAME),
    EventKind.INVITE: (56, 56),
    EventKind.MEMBER_REMOVE: (40, 40),
    EventKind.KEY: (4, 4 + membership.KEY_ENTRY_BYTES * membership.MAX_MEMBERS),
    EventKind.CLIENT: (CLIENT_NONCE_BYTES, CLIENT_NONCE_BYTES),
    EventKind.RENAME: (33, 32 + MAX_DEVICE_NAME),
    EventKind.UNHELD: (CONTENT_ID_BYTES, CONTENT_ID_BYTES * UNHELD_PER_EVENT),
}
BATCH_VERSIONS = 1000  # versions per journal event: keeps events well under frame limits
MAX_ANCESTRY = 64  # versions looked at to tell whether a live version replaced one held
RESCANS = 3  # rounds of an off-loop scan for paths that changed while it looked at them
PROGRESS_EVERY = 0.1  # seconds between progress reports an off-loop scan hands the loop
_Item = TypeVar("_Item")
INDEX_STEP_ROWS = 4096  # chunk rows per step of a scan's index: ~one 256 MiB file, ~10 ms
INDEX_PAUSE_S = 0.005  # the loop's turn between two steps: long enough to answer a request


@dataclass
class ScanSummary:
    added: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)  # this scan's, known or not
    fresh: list[Problem] = field(default_factory=list)  # those not reported before
    waiting: str | None = None  # why nothing was recorded (a joiner, a restored share)
    unchanged: int = 0
    hashed_bytes: int = 0
    events: int = 0
    seconds: float = 0.0


@dataclass
class Indexing:
    """What a recorded scan still has to write to the chunk index: each new file's chunk
    locations, with its scan-cache entry (written unsettled with the recording, settled
    only here: a crash in between leaves the file to be hashed and indexed again by the
    next scan), and the replaced contents' locations under their store entries. Apart
    from the recording so that the node can push the new versions first: the index
    rows are most of a large file's recording (docs/decisions.md)."""

    files: list[tuple[LocalEntry, Manifest]] = field(default_factory=list)
    kept: list[bytes] = field(default_factory=list)  # contents now held by the store alone


def find_root(start: Path) -> Path | None:
    """The share containing ``start`` (itself or an ancestor), if any."""
    for candidate in (start, *start.parents):
        if (candidate / METADATA_DIR / DB_FILE).exists():
            return candidate
    return None


REVOKED = bytes(32)  # the "user" of an invite revoked by a removal
WAITING_FOR_GENESIS = "this device has not received the share's history yet: sync first"


class ShareBusy(BackerError):
    """Another process holds the share (``run`` takes requests: see control)."""

    def __init__(self, root: Path) -> None:
        super().__init__(f"the share {root} is in use by another backer process (run, sync, scan)")
        self.root = root


def _marker(root: Path) -> tuple[int, int] | None:
    """The identity (device, inode) of the share's ``.backer`` directory; None if gone."""
    try:
        info = os.stat(root / METADATA_DIR)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def take_lock(root: Path) -> IO[bytes]:
    """One process changes a share at a time (run, sync, scan, join)."""
    handle = open(root / METADATA_DIR / LOCK_FILE, "ab")  # noqa: SIM115 - held until close()
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ShareBusy(root) from None
    return handle


def _check_db(db: sqlite_utils.Database, whole: bool) -> None:
    """Raise if the database is not a whole share database (with ``whole``, sqlite's
    quick check; always the tables and identity every share has: an emptied file would
    otherwise look new)."""
    if whole:
        db.conn.execute("PRAGMA quick_check").fetchone()
    if not {"meta", "live"} <= set(db.table_names()):
        raise ValueError("its tables are missing")
    if db.conn.execute("SELECT 1 FROM meta WHERE key = 'share_id'").fetchone() is None:
        raise ValueError("the share id is missing")


REPAIR_HINT = "run 'backer repair --from HOST:PORT --dir {root}' to rebuild it from a peer"


class DamagedShare(BackerError):
    """The share's database cannot be trusted; ``backer repair`` rebuilds it in place."""

    def __init__(self, root: Path, reason: object) -> None:
        super().__init__(
            f"the share database in {root / METADATA_DIR} is damaged ({reason}); "
            + REPAIR_HINT.format(root=root)
            + " (your files are left as they are)"
        )
        self.root = root


class UnfinishedShare(BackerError):
    """A share database cut short while it was being made (a killed ``join`` or
    ``init``): nothing was recorded in it yet, so the way on is to run that again."""

    def __init__(self, root: Path) -> None:
        super().__init__(
            f"the share in {root} was never finished (an interrupted 'join' or 'init'): "
            "run 'backer join' again with the same token, or 'backer init' again"
        )
        self.root = root


def unfinished_create(path: Path) -> bool:
    """Whether a share database was cut short while being made: no journal yet and no
    share id (a share that ever held an event has its journal tables)."""
    try:
        with contextlib.closing(sqlite3.connect(path)) as db:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
            if "events" in tables:
                return False
            if "meta" not in tables:
                return True
            return db.execute("SELECT 1 FROM meta WHERE key = 'share_id'").fetchone() is None
    except sqlite3.DatabaseError:
        return False


def abandoned_create(root: Path, home: Path | None) -> bool:
    """Whether ``root/.backer`` is what a killed ``init`` or ``join`` left before its
    share had an id: nothing but backer's database and lock files, no share id in them,
    and no share this device remembers at ``root``. Nothing was recorded, so making the
    share again loses nothing (it used to say 'already a share' to ``init`` and 'damaged,
    run repair' to every other command, with no peer to repair from)."""
    metadata = root / METADATA_DIR
    if not metadata.is_dir() or (home is not None and recovery.share_at(home, root)):
        return False
    names = {entry.name for entry in metadata.iterdir()}
    database_files = {DB_FILE, f"{DB_FILE}-journal", f"{DB_FILE}-wal", f"{DB_FILE}-shm"}
    if not names <= database_files | {LOCK_FILE}:
        return False
    return DB_FILE not in names or unfinished_create(metadata / DB_FILE)


def clear_abandoned(root: Path) -> None:
    """Remove what :func:`abandoned_create` found (the directory itself stays)."""
    for leftover in (root / METADATA_DIR).iterdir():
        leftover.unlink()


def is_damage(exc: BaseException) -> bool:
    """Whether an error reading the share's own database means the database is damaged
    (not merely busy, unreadable or on a full disk)."""
    if isinstance(exc, sqlite3.OperationalError):
        return str(exc).startswith("no such")
    return isinstance(exc, (sqlite3.DatabaseError, JournalError, ValueError))


OPEN_NEEDS_BYTES = 1024 * 1024  # what SQLite may need to open a share (WAL and its index)


def _out_of_room(root: Path) -> bool:
    """Whether the share's filesystem is (all but) full."""
    try:
        info = os.statvfs(root)
    except OSError:
        return False
    return info.f_bavail * info.f_frsize < OPEN_NEEDS_BYTES


def lost_share_error(start: Path, home: Path | None) -> BackerError:
    """The error for a folder that holds no share: say so, and if it looks like a share
    that lost its ``.backer/`` (the device remembers one here, or was a member of some
    share and the folder has files), point at ``backer repair``, not at a new share."""
    for candidate in (start, *start.parents):
        if (candidate / METADATA_DIR).is_dir():  # the directory is there, its database not
            if abandoned_create(candidate, home):
                return UnfinishedShare(candidate)
            return DamagedShare(candidate, f"{DB_FILE} is missing")
    known = recovery.share_at(home, start) if home is not None else None
    if known is not None:
        return BackerError(
            f"the share {known.share_id.hex()} at {known.root} has lost its {METADATA_DIR}/ "
            "directory; "
            + REPAIR_HINT.format(root=known.root)
            + " ('backer init' would make a new, unrelated share)"
        )
    if home is not None and recovery.knows_any_share(home) and any(start.iterdir()):
        return BackerError(
            f"not inside a share: {start}; if it was a share that lost its {METADATA_DIR}/, "
            f"run 'backer repair --token TOKEN --dir {start}' with an invite from a peer "
            "('backer init' makes a new, unrelated share)"
        )
    return BackerError(f"not inside a share: {start} (run 'backer init' first)")


class Share:
    """One synced folder on this device."""

    def __init__(
        self,
        root: Path,
        key: nacl.signing.SigningKey,
        exclusive: bool = True,
        home: Path | None = None,
    ) -> None:
        """``exclusive``: this process may change the share (and must be the only one).
        ``home``: the device's own directory (outside the share), where the length of its
        own log is kept to notice a share restored from an older copy (see recovery)."""
        self.root = root
        self.home = home
        self.key = key
        self.device = bytes(key.verify_key)
        self._lock = take_lock(root) if exclusive else None
        if exclusive:
            remove_spares(root)  # (a killed process's: the lock is ours now)
        self.marker = _marker(root)  # what root_moved compares with
        self.rejected_paths: list[str] = []  # from peers: never indexed, never written
        self.unwritable: set[tuple[str, str]] = set()  # (path, version id) failed for good here
        self.temps_in_use: set[str] = set()  # files being assembled (relative): not leftovers
        self.resumable_temps: set[Path] = set()  # kept for a later attempt at their version
        self.repairing = False  # rebuilding the journal from a peer: scan and apply nothing
        self.rescan_due = False  # its own events came back: its disk is to be scanned whole
        self.on_rescan_due: Callable[[], None] | None = None  # told when it becomes due
        self.indexing = False  # a scan's chunk locations are being written: not read yet
        self.problems: dict[tuple[str, str], Problem] = {}  # this process's, by (source, path)
        self._pending_clients: dict[int, bytes] = {}  # declared by checked, unstored events
        self.fresh_problems: list[Problem] = []  # this process's not reported before
        database = root / METADATA_DIR / DB_FILE
        # the integrity check only after an unclean close (see backer.db.integrity)
        self.checked = not integrity.closed_cleanly(database, consume=exclusive)
        # (no sqlite-utils plugins: finding them reads every installed package's metadata,
        # ~40 ms of CPU before every command's first byte, and they would hook this
        # connection; backer uses none)
        self.db = sqlite_utils.Database(str(database), execute_plugins=False)
        try:
            _check_db(self.db, self.checked)
            self.journal = Journal(self.db)
            self.catalog = Catalog(self.db)
            self.members = Members(*self.catalog.member_table())
            new_bindings = self._create_bindings()
            self._doc_position = self._load_snapshot()
            if new_bindings:
                self._bind_stored_clients()
            self._replay()
            self.own_events_missing = self._own_events_missing()
            if exclusive:  # what a scan killed before its chunk index left (R39)
                with self.db.conn:
                    Store(root, self.catalog).register_left()
        except Exception as exc:
            self._release()
            remembered = home is not None and recovery.share_at(home, root) is not None
            if not remembered and unfinished_create(root / METADATA_DIR / DB_FILE):
                raise UnfinishedShare(root) from exc  # (an emptied database of a known
                # share looks the same, but the device home remembers that share)
            if is_damage(exc):
                raise DamagedShare(root, exc) from exc
            raise
        self._remember()

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: Path,
        key: nacl.signing.SigningKey,
        joining: tuple[bytes, bytes] | None = None,
        home: Path | None = None,
        repairing: bool = False,
    ) -> Share:
        """Make ``root`` a share: a new one with this device as founding member, or,
        with ``joining=(share_id, share_key)``, an empty replica that a peer fills.
        ``repairing``: ``.backer/`` stays (its damaged database was moved aside)."""
        if not root.exists():
            raise BackerError(f"directory does not exist: {root}")
        if not root.is_dir():
            raise BackerError(f"not a directory: {root}")
        again = not repairing and abandoned_create(root, home)
        if again:
            clear_abandoned(root)
        if (root / METADATA_DIR / DB_FILE).exists() or (
            (root / METADATA_DIR).exists() and not repairing and not again
        ):
            raise BackerError(f"already a share: {root}")
        outer = find_root(root.parent)
        if outer is not None:
            raise BackerError(f"{root} is inside the share {outer}; shares cannot nest")
        (root / METADATA_DIR).mkdir(mode=0o700, exist_ok=repairing or again)
        recovery.sync_directory(root)  # (a power cut must not leave the device home
        # remembering a share whose .backer/ the disk never kept)
        db = sqlite_utils.Database(str(root / METADATA_DIR / DB_FILE), execute_plugins=False)
        os.chmod(root / METADATA_DIR / DB_FILE, 0o600)
        catalog = Catalog(db)
        share_id, share_key = joining or (
            entropy.token(SHARE_ID_BYTES),
            entropy.token(32),
        )
        with db.conn:
            catalog.set_meta("share_id", share_id)
            catalog.set_meta("share_key", share_key)
            catalog.set_meta("device", bytes(key.verify_key))
        db.conn.close()
        recovery.sync_directory(root / METADATA_DIR)
        share = cls(root, key, home=home)
        if joining is None:
            share._append(EventKind.GENESIS, genesis_payload(share_id, host_name()))
        return share

    def admit(self, device_key: bytes, name: str, invite_id: bytes = NO_INVITE) -> Event:
        """Add a device to the share's members (a MEMBER_ADD event signed by us)."""
        if self.device not in self.members:
            raise BackerError("only a member can admit another device")
        if device_key in self.members.names:
            raise BackerError(
                "that device was admitted before (a removed device cannot be admitted again: "
                "it needs a new key)"
            )
        if self.members.full:
            raise BackerError(
                f"the share has admitted its maximum of {membership.MAX_MEMBERS} devices"
            )
        return self._append(EventKind.MEMBER_ADD, member_payload(device_key, name, invite_id))

    def admit_joiner(self, device_key: bytes, invite_id: bytes) -> None:
        """Admit a device that proved an invite's key. The invite is marked used in one
        transaction before the admission, so of two joiners racing on one token exactly
        one gets in; the device that used it may come back (an interrupted join)."""
        if self.own_events_missing:
            raise BackerError(self.behind_itself)
        if self.members.full:
            raise BackerError(
                f"the share has admitted its maximum of {membership.MAX_MEMBERS} devices"
            )
        with self.db.conn:
            claimed = self.catalog.use_invite(invite_id, device_key, time.time_ns() // 1_000_000)
        if claimed:
            name = f"joined with invite {invite_id[:4].hex()}"
            self._append(EventKind.MEMBER_ADD, member_payload(device_key, name, invite_id))
            return
        found = self.catalog.invite(invite_id)
        if found is not None and found[2] == device_key and device_key in self.members:
            return  # it was admitted with this invite and is back for the rest of the join
        if found is None or found[2] is None:
            raise BackerError("this invite has expired")
        raise BackerError("this invite has already been used")

    def rename_device(self, device: bytes, name: str) -> Event | None:
        """Give ``device`` a new name, signed (a RENAME event); None if it has that name
        already. Only a device renames itself: a member cannot relabel another device
        to have the wrong one removed (docs/decisions.md)."""
        if device != self.device:
            raise BackerError(
                "a device can only rename itself: run 'backer device rename NAME' on that device"
            )
        if device not in self.members:
            raise BackerError("this device is not a member of the share (yet): sync first")
        name = checked_name(name)
        if self.members.names[device] == name:
            return None
        return self._append(EventKind.RENAME, rename_payload(device, name))

    def announce_unheld(self, contents: Collection[bytes]) -> int:
        """Tell every device (signed UNHELD events) that this one no longer holds the
        bytes of ``contents``, so ``history`` everywhere can say when a version's bytes
        are on no device at all; return how many events that took."""
        ordered = sorted(contents)
        batches = [
            b"".join(ordered[i : i + UNHELD_PER_EVENT])
            for i in range(0, len(ordered), UNHELD_PER_EVENT)
        ]
        if batches:
            self._append_all([(EventKind.UNHELD, batch) for batch in batches])
        return len(batches)

    def create_invite(self, lifetime_s: int) -> tuple[bytes, bytes]:
        """A single-use invite, valid ``lifetime_s`` seconds: (invite id, one-time key)."""
        invite_id, psk = entropy.token(16), entropy.token(32)
        expires_ms = time.time_ns() // 1_000_000 + lifetime_s * 1000
        self._append(EventKind.INVITE, invite_payload(invite_id, psk, expires_ms))
        return invite_id, psk

    def invite_key(self, invite_id: bytes) -> bytes | None:
        """The one-time key a joiner may use: that of an invite still valid, or of one a
        device already used (it may be back to finish its join; :meth:`admit_joiner`
        then checks it is the same device)."""
        found = self.catalog.invite(invite_id)
        if found is None:
            return None
        psk, expires_ms, used_by = found
        if used_by == REVOKED or (used_by is None and expires_ms < time.time_ns() // 1_000_000):
            return None
        return psk

    def invites_used_twice(self) -> dict[bytes, list[bytes]]:
        """Invites that admitted more than one device still a member: invite id -> those
        devices, oldest admission first. Each device enforces single use atomically,
        but two members out of touch can each admit a joiner with the same token; once
        both admissions have reached a device, it shows them here (docs/security.md)."""
        admitted: dict[bytes, list[bytes]] = {}
        for device, author, seq in self.catalog.admissions():
            if device in self.members.removed:
                continue
            for event in self.journal.events(author, seq, seq + 1):
                invite_id = membership.admission_invite(event)
                if invite_id is not None:
                    admitted.setdefault(invite_id, []).append(device)
        return {invite: devices for invite, devices in admitted.items() if len(devices) > 1}

    def invite_outcome(self, invite_id: bytes) -> bytes | None:
        """The device that used an invite; None while it is still valid and unused;
        raise once it expired or was revoked."""
        found = self.catalog.invite(invite_id)
        if found is None:
            raise BackerError("unknown invite")
        _, expires_ms, used_by = found
        if used_by == REVOKED:
            raise BackerError("the invite was revoked when a device was removed")
        if used_by is None and expires_ms < time.time_ns() // 1_000_000:
            raise BackerError("the invite expired before anyone joined")
        return used_by

    # -- removal and share keys --------------------------------------------------------

    def remove_device(self, device_key: bytes) -> None:
        """Remove a device: its events from here on are refused everywhere this removal
        reaches, unused invites are revoked, and a new share key is sealed to each
        remaining member (one journal append, so neither happens without the other)."""
        if device_key == self.device:
            raise BackerError("a device cannot remove itself: remove it from another device")
        refusal = self.members.refusal(device_key)
        if refusal is not None:
            raise BackerError(f"cannot remove that device: {refusal}")
        kept = self.journal.length(device_key)
        remaining = [d for d in self.members.active if d != device_key]  # admission order
        epoch = self.key_epoch + 1
        self._append_all(
            [
                (EventKind.MEMBER_REMOVE, remove_payload(device_key, kept)),
                (EventKind.KEY, key_payload(epoch, entropy.token(32), remaining)),
            ]
        )

    @property
    def key_epoch(self) -> int:
        rank = self.catalog.get_meta("key_rank") or bytes(4)
        return int.from_bytes(rank[:4], "big")

    @property
    def share_keys(self) -> list[bytes]:
        """Every share key this device holds, the current one first: a responder accepts
        any of them from a member (see docs/decisions.md)."""
        older = self.catalog.get_meta("old_share_keys") or b""
        keys = [self.share_key, *(older[i : i + 32] for i in range(0, len(older), 32))]
        return [k for k in keys if k]

    def _take_key(self, event: Event) -> None:
        """A KEY event sealed to us: its key becomes current if it ranks above ours
        (epoch, then event id: the same choice on every device), else an older one."""
        opened = open_key(event.payload, self.key)
        if opened is None:
            return
        epoch, key = opened
        keys = self.share_keys
        if key in keys:
            return
        rank = epoch.to_bytes(4, "big") + event.id
        if rank > (self.catalog.get_meta("key_rank") or b""):
            keys.insert(0, key)
            self.catalog.set_meta("key_rank", rank)
        else:
            keys.insert(1, key)
        self.catalog.set_meta("share_key", keys[0])
        self.catalog.set_meta("old_share_keys", b"".join(keys[1:]))

    @classmethod
    def open(
        cls,
        start: Path,
        key: nacl.signing.SigningKey,
        exclusive: bool = True,
        home: Path | None = None,
    ) -> Share:
        if not start.exists():
            raise BackerError(f"directory does not exist: {start}")
        root = find_root(start.resolve())
        if root is None:
            raise lost_share_error(start.resolve(), home)
        try:
            share = cls(root, key, exclusive, home)
        except (sqlite3.OperationalError, OSError) as exc:
            if _out_of_room(root):  # SQLite says only "disk I/O error" when it cannot grow
                raise BackerError(
                    f"disk full: no room left in {root} to open the share database; "
                    "free some space and run the command again"
                ) from exc
            raise
        try:
            share.journal.verify()
        except CorruptJournal as exc:
            share._release()
            raise DamagedShare(root, exc) from exc
        if share.catalog.get_meta("device") != share.device:
            raise BackerError(
                f"the share {root} belongs to another device key (is BACKER_HOME set right?)"
            )
        return share

    def close(self) -> None:
        """Save the document's snapshot and let go. A disk with no room for it closes
        the share all the same, not cleanly: the snapshot is a start-up cache (the next
        open checks the database and replays what came after the last one)."""
        saved = False
        try:
            if self._lock is not None:
                self.release_memory()  # (the snapshot is held twice while it is encoded)
                self.save_snapshot()
                saved = True
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
                raise
        finally:  # (a snapshot that cannot be written must not keep the lock held)
            self._release(saved)

    def _release(self, cleanly: bool = False) -> None:
        """Let go of the database and the lock without writing anything more;
        ``cleanly``: say so beside the database, so that the next open need not check
        it (see backer.db.integrity)."""
        self.db.conn.close()
        if self._lock is not None:
            if cleanly:
                integrity.mark_closed(self.root / METADATA_DIR / DB_FILE)
            self._lock.close()

    def __enter__(self) -> Share:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def share_key(self) -> bytes:
        """The secret every member holds (empty on a joiner until it is welcomed)."""
        return self.catalog.get_meta("share_key") or b""

    def set_share_key(self, share_key: bytes) -> None:
        with self.db.conn:
            self.catalog.set_meta("share_key", share_key)
        self._remember()

    def _remember(self) -> None:
        """Note in the device home where this share is, its key, and its founder once
        known (not from a history a repair has not checked yet: see repair.finish)."""
        if self.home is not None and self.share_key:
            founder = b"" if self.repairing else self.members.founder
            recovery.remember_share(self.home, self.share_id, self.share_key, self.root, founder)

    @property
    def share_id(self) -> bytes:
        value = self.catalog.get_meta("share_id")
        assert value is not None
        return value

    # -- journal -> state -> catalog ---------------------------------------------------

    def _load_snapshot(self) -> int:
        """Load the document snapshot; return the journal position it covers. A snapshot
        whose checksum does not match (damaged bytes, or one saved before checksums) is
        only a cache: the document is rebuilt from the journal instead."""
        self._pending_clients.clear()
        snapshot = self.catalog.get_meta("doc_snapshot")
        if snapshot is not None and blake3(snapshot).digest() == self.catalog.get_meta(
            "doc_snapshot_hash"
        ):
            self.state = FileState(snapshot, self.device)
            return self.catalog.get_int("doc_position")
        self.state = FileState(None, self.device)
        return 0

    def _replay(self) -> None:
        """Apply journal events that the snapshot or the catalog has not seen yet.

        A stored event that cannot be applied (stored before payloads were checked, or by
        a bug) is quarantined with the rest of its author's log: set aside, reported by
        ``status``, never relayed; the document is rebuilt without it."""
        while not self._replay_until_quarantine():
            self.state.close()
            self._doc_position = self._load_snapshot()

    def _replay_until_quarantine(self) -> bool:
        catalog_position = self.catalog.get_int("catalog_position")
        held = self.journal.quarantine_starts()
        for position, event in self.journal.since(min(self._doc_position, catalog_position)):
            if event.seq >= held.get(event.author, event.seq + 1):
                if position > catalog_position:
                    with self.db.conn:
                        self.catalog.set_meta("catalog_position", position)
                continue
            try:
                delta = self._apply_checked(event)
            except BadUpdate as exc:
                with self.db.conn:
                    self.journal.quarantine([event], str(exc))
                return False
            if position > catalog_position:
                with self.db.conn:
                    self._record(position, event, delta)
        return True

    def _reload_state(self) -> None:
        """Rebuild the document from the snapshot and the stored journal, after an
        update that was not stored may have half-changed it."""
        self.state.close()
        self._doc_position = self._load_snapshot()
        self._replay()

    def _apply_checked(self, event: Event) -> Delta:
        """Check and apply one event's payload; a CLIENT declaration binds its client id
        in memory until stored, so the STATE events after it in one run may use it.
        Raises :class:`BadUpdate` (the document must then be reloaded)."""
        _check_event(event)
        author = event.author
        if event.kind == EventKind.CLIENT:
            client = derive_client(author, event.payload)
            if self._bound_to(client) not in (None, author):
                raise BadUpdate(f"declares client id {client}, which another device owns")
            self._pending_clients[client] = author
            return Delta()
        if event.kind != EventKind.STATE:
            return Delta()
        shape = self.state.check(event.payload, lambda client: self._refusal(client, author))
        delta = self.state.apply(event.payload, shape)
        added: dict[str, tuple[str, bytes]] = {}
        for key, record in delta.added.items():
            path, version_id = split_key(key)
            if added.setdefault(version_id, (path, record))[0] != path:
                raise BadUpdate(f"rewrites the recorded version {version_id}")
        for version_id, known in self.catalog.recorded(list(added)).items():
            if known != added[version_id]:
                raise BadUpdate(f"rewrites the recorded version {version_id}")
        return delta

    # -- Yjs client ids belong to the author that declared them ------------------------

    def _create_bindings(self) -> bool:
        if "clients" in self.db.table_names():
            return False
        with self.db.conn:
            self.db.conn.execute(
                "CREATE TABLE clients (client INTEGER PRIMARY KEY, author BLOB NOT NULL)"
            )
        return True

    def _bind_stored_clients(self) -> None:
        """A share from before client ids were bound: bind those its journal used (to
        the first author seen using each; declared ids came later)."""
        with self.db.conn:
            for _, event in self.journal.since(0):
                if event.kind == EventKind.STATE:
                    try:
                        clients = parse_update(event.payload).clients
                    except BadUpdate:
                        continue
                    self._claim(clients, event.author)

    def _refusal(self, client: int, author: bytes) -> str | None:
        """Why ``author``'s STATE event may not hold items under ``client``, if it may not."""
        owner = self._bound_to(client)
        if owner == author:
            return None
        if owner is None:
            return f"items under an undeclared client id {client}"
        return f"items under client id {client}, which another device owns"

    def _bound_to(self, client: int) -> bytes | None:
        """The author ``client`` is bound to: by a stored event or one being checked."""
        return self._pending_clients.get(client) or self._owner(client)

    def _owner(self, client: int) -> bytes | None:
        row = self.db.conn.execute(
            "SELECT author FROM clients WHERE client = ?", (client,)
        ).fetchone()
        return row[0] if row else None

    def _claim(self, clients: Iterable[int], author: bytes) -> None:
        self.db.conn.executemany(
            "INSERT OR IGNORE INTO clients (client, author) VALUES (?, ?)",
            [(client, author) for client in clients],
        )

    def _record(self, position: int, event: Event, delta: Delta) -> None:
        """Fold one stored event into the catalog (inside the caller's transaction)."""
        if event.kind == EventKind.CLIENT:
            client = derive_client(event.author, event.payload)
            self._claim([client], event.author)
            self._pending_clients.pop(client, None)
        admission = self.members.admitted(event)
        if admission is not None:
            device_key, name, invite_id = admission
            self.catalog.add_member(device_key, name, event.author, event.seq)
            self.members.names[device_key] = name
            if invite_id != NO_INVITE:
                self.catalog.use_invite(invite_id, device_key)
        renaming = self.members.renaming(event)
        if renaming is not None:
            self.members.names[renaming[0]] = renaming[1]
            self.catalog.rename_member(*renaming, event.seq)
        removal = self.members.removal(event)
        if removal is not None:
            self._remove(*removal, event)
        if self.members.valid_author(event.author, event.seq):
            if event.kind == EventKind.INVITE:
                self.catalog.add_invite(*parse_invite(event.payload), event.raw)
            elif event.kind == EventKind.KEY:
                self._take_key(event)
            elif event.kind == EventKind.UNHELD:
                self.catalog.note_unheld(
                    event.author, unheld_contents(event.payload), event.time_ms
                )
        if delta:
            for key in [k for k in delta.added if not is_valid(split_key(k)[0])]:
                del delta.added[key]
                self.rejected_paths.append(split_key(key)[0])
            self.catalog.apply_delta(delta, event.author, position)
        self.catalog.set_meta("catalog_position", position)

    def _remove(self, device: bytes, kept: int, event: Event) -> None:
        """Apply a removal: what the device signed from its removal point on no longer
        counts, so admissions and removals it made there (reaching us before the news
        of its removal) are undone; unused invites are revoked (it knows their keys)."""
        self.catalog.remove_member(device, kept, event.author, event.seq)
        self.members.removed[device] = kept
        self.members.names[device] = self.catalog.undo_renames(device, kept)
        restored, dropped = self.catalog.undo_member_changes(device, kept)
        for key in restored:
            self.members.removed.pop(key, None)
        for key in dropped:
            self.members.names.pop(key, None)
            self.members.removed.pop(key, None)
        self.catalog.revoke_invites(REVOKED)

    def _append(
        self,
        kind: EventKind,
        payload: bytes,
        delta: Delta | None = None,
        alongside: Callable[[], None] | None = None,
    ) -> Event:
        return self._append_all([(kind, payload)], delta, alongside)

    def _append_all(
        self,
        entries: list[tuple[EventKind, bytes]],
        delta: Delta | None = None,
        alongside: Callable[[], None] | None = None,
    ) -> Event:
        """Sign ``entries`` onto our log in one append (``delta``: of a single STATE
        entry), preceded by the declaration of our client id before its first STATE
        event; fold them into the catalog, and run ``alongside``, in the journal's
        transaction; return the last event. If any of it fails, none of it is stored
        and the document is rebuilt from what is."""
        if self.own_events_missing:
            raise BackerError(self.behind_itself)
        writes = any(kind == EventKind.STATE for kind, _ in entries)
        if writes and self._owner(self.state.doc.client_id) != self.device:
            entries = [(EventKind.CLIENT, self.state.nonce), *entries]

        def fold(events: list[Event]) -> None:
            position = self.journal.position() - len(events)
            for event in events:
                position += 1
                state = event.kind == EventKind.STATE
                self._record(position, event, (delta or Delta()) if state else Delta())
            if alongside is not None:
                alongside()

        try:
            events = self.journal.append(self.key, entries, self.now_ms(), fold)
        except Exception:
            self.members = Members(*self.catalog.member_table())
            self._reload_state()
            raise
        if self.home is not None:
            recovery.record_own_length(self.home, self.share_id, events[-1].seq + 1)
        return events[-1]

    # -- a share restored from an older copy -------------------------------------------

    def _own_length(self) -> int:
        checkpoint = self.journal.summary().get(self.device)
        return checkpoint.length if checkpoint else 0

    def now_ms(self) -> int:
        """The time this device records now: its clock, but never before its last event.
        A clock stepped back (NTP correcting one that was ahead, at a reboot or not)
        would otherwise date its next edits before what they replace: ``history``, ``ls
        --at`` and ``restore --at`` would show the newer version as the older one."""
        length = self.journal.length(self.device)
        last = next(self.journal.events(self.device, length - 1), None) if length else None
        return max(entropy.now_ms(), last.time_ms if last is not None else 0)

    def _own_events_missing(self) -> int:
        if self.home is None:
            return 0
        return max(0, recovery.own_length(self.home, self.share_id) - self._own_length())

    def _adopt_own(self, delta: Delta) -> None:
        """A version this device recorded and lost with the restore described its own
        disk: point the scan cache at it (with a stat that never matches, so the next
        scan re-reads the file), so that what the disk holds now — the same bytes, an
        edit, or nothing — is recorded as seen after it, never beside it. The version
        that cache named there was replaced by one of those lost records, which kept its
        bytes in the store and noted them at the store's entry: the older copy's chunk
        index still finds them at the path, so they are noted at the entry again."""
        store = Store(self.root, self.catalog)
        added = [(*split_key(key), record) for key, record in delta.added.items()]
        cached = self.catalog.local_entries(path for path, _, _ in added if is_valid(path))
        for path, version_id, record in added:
            if not is_valid(path):
                continue
            held = cached.get(path)
            replaced = self.catalog.version(held.version_id) if held is not None else None
            if replaced is not None and replaced.kind == Kind.FILE and store.has(replaced.content):
                store.register(replaced.content)
            if Version.decode(record).kind == Kind.DELETED:
                self.catalog.drop_local([path])
            else:
                self.catalog.set_local([LocalEntry(path, version_id, -1, 0, 0, 0, False)])

    def _rescan_now(self) -> None:
        """Its own events are back: a whole scan is due now. The scans made while it
        waited recorded nothing, so what its person did meanwhile would otherwise wait
        for the next full scan (the node's is hourly)."""
        self.rescan_due = True
        if self.on_rescan_due is not None:
            self.on_rescan_due()

    @property
    def behind_itself(self) -> str:
        return (
            f"this share was restored from an older copy: {self.own_events_missing} of this "
            "device's own newer events are missing; sync with a peer to get them back (or, "
            "if no device ever received them, 'backer scan --forget-lost-history')"
        )

    def forget_lost_history(self) -> int:
        """Give up the events no peer returned (see recovery); how many were given up."""
        lost = self.own_events_missing
        if self.home is not None and lost:
            recovery.record_own_length(self.home, self.share_id, self._own_length())
        self.own_events_missing = 0
        return lost

    def _within_removal(
        self, raws: list[bytes], checkpoint: Checkpoint | None
    ) -> tuple[list[bytes], Checkpoint | None]:
        """A removed author's run cut to the events made before its removal point (a
        peer that got the rest before it learned of the removal may still send them)."""
        kept = self.members.removed.get(Event.decode(raws[0]).author) if raws else None
        if kept is None:
            return raws, checkpoint
        raws = [raw for raw in raws if Event.decode(raw).seq < kept]
        if checkpoint is not None and checkpoint.length > kept:
            checkpoint = None  # each kept event's own signature is checked instead
        return raws, checkpoint

    # -- remote changes ----------------------------------------------------------------

    def ingest(self, raws: list[bytes], checkpoint: Checkpoint | None) -> IngestResult:
        """Verify one author's events from a peer, check and apply each in order, and
        only then store them; any failure refuses them all (see docs/security.md).

        A device that holds no journal yet (a joiner) accepts only a log that starts
        with this share's GENESIS event.
        """
        members = self.members
        founding = not members
        if founding:
            first = Event.decode(raws[0]) if raws else None
            genesis = (
                first is not None
                and first.seq == 0
                and first.kind == EventKind.GENESIS
                and first.payload[:SHARE_ID_BYTES] == self.share_id
            )
            if not genesis:
                raise RejectedBatch("a new device must first receive the share's genesis")
        raws, checkpoint = self._within_removal(raws, checkpoint)
        held = self.journal.quarantine_starts()
        checked: list[Delta] = []

        def admit(events: list[Event]) -> None:
            """Check and apply every new event before any is stored."""
            if events[0].author in held:  # the rest of a quarantined log: kept, not applied
                return
            for event in events:
                try:
                    checked.append(self._apply_checked(event))
                except BadUpdate as exc:
                    self._reload_state()
                    raise RejectedBatch(
                        f"event {event.seq} of {event.author.hex()[:16]}: {exc}"
                    ) from exc

        try:
            result = self.journal.ingest(
                raws, checkpoint, lambda author: not members or author in members.names, admit
            )
        except sqlite3.Error:
            self._reload_state()
            raise
        position = self.journal.position() - len(result.added)
        if result.added and result.added[0].author in held:
            with self.db.conn:
                self.journal.quarantine(result.added, "follows a quarantined event")
                self.catalog.set_meta("catalog_position", self.journal.position())
            return result
        recovering = bool(self.own_events_missing)
        for event, delta in zip(result.added, checked, strict=True):
            position += 1
            with self.db.conn:
                self._record(position, event, delta)
                if recovering and event.author == self.device:
                    self._adopt_own(delta)
        if self.own_events_missing and raws and Event.decode(raws[0]).author == self.device:
            self.own_events_missing = self._own_events_missing()  # a peer gave some back
            if not self.own_events_missing:
                self._rescan_now()
        if founding and result.added:
            self._remember()  # (a joiner: its founder is known from now on)
        return result

    def resolve_conflicts(self) -> int:
        """Record the deterministic resolution of every conflicted path (see materializer).

        Every device computes the same keys, so concurrent resolutions agree. Returns the
        number of paths resolved. Nothing while this share is behind itself (see
        recovery): a resolution is an event of our own.
        """
        if self.own_events_missing:
            return 0
        resolved = 0
        for _ in range(MAX_RESOLUTION_ROUNDS):
            resolutions = {
                path: resolve(path, self.catalog.live_versions(path))
                for path in self.catalog.conflicted_paths()
            }
            if not resolutions:  # (each reads only the versions it can concern)
                resolutions = resolve_shadowed(self.catalog.live_above_others())
            if not resolutions:
                copies = self.catalog.live_named(CONFLICT_MARK)
                resolutions = resolve_moot_copies(copies, self._source_replaced)
            changed = False
            paths = list(resolutions.items())
            for start in range(0, len(paths), RESOLUTIONS_PER_EVENT):  # events stay small
                writes: list[tuple[str, str, Version]] = []  # enough to travel (a frame)
                removals: list[tuple[str, str]] = []
                for path, resolution in paths[start : start + RESOLUTIONS_PER_EVENT]:
                    removals += [(path, vid) for vid in resolution.drop]
                    writes += resolution.copies
                    resolved += 1
                if writes or removals:
                    update, delta = self.state.write(writes, removals)
                    self._append(EventKind.STATE, update, delta)
                    changed = True
            if not changed:
                break
        return resolved

    def _source_replaced(self, source: str, copy: str) -> bool:
        """Whether a conflict copy's source — or, for a copy of a copy, any source up
        its lineage — was superseded by a version other than the copy made from it."""
        for _ in range(MAX_RESOLUTION_ROUNDS):
            if self.catalog.superseded_by_other_than(source, copy):
                return True
            record = self.catalog.version(source)
            parent = is_copy_of(source, record) if record is not None else None
            if parent is None:
                return False
            source, copy = parent, source
        return False

    def release_memory(self) -> None:
        """Hand back what a whole scan or a first sync leaves behind: SQLite's page
        cache (filled by the start-up check of the database and by the scan; it fills
        again when needed) and the heap pages the per-file objects freed, which glibc
        would otherwise keep. Measured on 100,000 files: an idle node after its scan
        149 -> 123 MiB; a join's close 148 -> 114 MiB, under which the document's
        encoding (~11 MB, held twice) then stays, where it came on top of the 148."""
        self.db.conn.execute("PRAGMA shrink_memory")
        trim_heap()

    def save_snapshot(self) -> None:
        """Keep the document in SQLite so that start-up does not replay everything."""
        position = self.catalog.get_int("catalog_position")
        if position == self._doc_position:
            return
        snapshot = self.state.snapshot()
        with self.db.conn:
            self.catalog.set_meta_large("doc_snapshot", snapshot)
            self.catalog.set_meta("doc_snapshot_hash", blake3(snapshot).digest())
            self.catalog.set_meta("doc_position", position)
        self._doc_position = position

    # -- local changes -----------------------------------------------------------------

    def commit(
        self,
        versions: list[tuple[str, Version]],
        settle: Callable[[dict[str, str]], None] | None = None,
    ) -> dict[str, str]:
        """Record local versions (their ``supersedes`` already set), one journal event
        per batch; returns the new version id of each path. ``settle`` gets each
        batch's ids inside its event's transaction, to write the scan cache there: a
        device that recorded a version without knowing its disk holds it would record
        the person's next edit of that file beside it, not after it."""
        assigned: dict[str, str] = {}
        for start in range(0, len(versions), BATCH_VERSIONS):
            writes, batch = [], {}
            for path, version in versions[start : start + BATCH_VERSIONS]:
                batch[path] = new_version_id()
                writes.append((path, batch[path], version))
            update, delta = self.state.write(writes)
            alongside = None if settle is None else functools.partial(settle, batch)
            self._append(EventKind.STATE, update, delta, alongside)
            assigned.update(batch)
        return assigned

    def root_moved(self) -> str | None:
        """Why the folder at ``root`` is no longer this share, if it is not: its
        ``.backer`` is not the directory the share was opened from (the folder was moved
        away or replaced, or its disk unmounted). Nothing is then scanned or applied: an
        empty mount point scanned would record every file as deleted."""
        if _marker(self.root) == self.marker:
            return None
        return (
            f"the share folder {self.root} is gone or no longer this share (moved away, "
            "replaced, or its disk unmounted): nothing is recorded or written until it is back"
        )

    def scan(
        self, progress: ProgressCallback | None = None, paths: Collection[str] | None = None
    ) -> ScanSummary:
        """Scan the folder (or only ``paths``: each with its subtree, a path gone from
        the disk deleted) and record every change as new versions (none while the share
        is behind itself: the change would be an event of our own; see recovery)."""
        if self.repairing:  # the disk is recognised once the journal is back (see repair)
            return ScanSummary(waiting="the share is being repaired")
        if (moved := self.root_moved()) is not None:
            return ScanSummary(waiting=moved)
        self._remove_left_placeholders()
        started = time.monotonic()
        total = ScanSummary()

        def record(part: Observation) -> None:
            _add_summary(total, self._record_and_index(part, started))

        # A batch is recorded while the walk goes on (bounded memory; a scan stopped
        # half-way leaves its recorded batches, and the next scan sees the rest as new)
        # unless nothing would be recorded anyway.
        streamed = record if self.members and not self.own_events_missing else None
        local_after = functools.partial(read_local_after, self.catalog.conn)
        found = look(
            self.root,
            self.catalog.local_entries,
            paths,
            progress,
            record=streamed,
            local_after=local_after,
            names_of=functools.partial(read_local_names, self.catalog.conn),
        )
        summary = self._record_and_index(found, started)
        if summary.waiting is not None:
            return summary
        _add_summary(total, summary)
        total.seconds = time.monotonic() - started
        return total

    def _remove_left_placeholders(self) -> None:
        """Remove the empty placeholders a killed window left before this scan records
        them as the person's files (see :mod:`backer.fs.placeholders`)."""

        def recorded(path: str, info: os.stat_result) -> bool:
            entry = self.catalog.local_entries([path]).get(path)
            return entry is not None and entry.stat_key == stat_key_of(info)

        disk = functools.cache(functools.partial(share_disk, self.root))  # (once notes are)

        def open_parent(path: str) -> int:  # (a disk mounted there since is not the share: R63)
            return open_directory(self.root, path.rpartition("/")[0], disk=disk())

        remove_left(self.root, recorded, open_parent)

    def _record_and_index(self, found: Observation, started: float) -> ScanSummary:
        """Classify what a walk found, record it and write its chunk index at once; the
        index's steps in one transaction, as no loop waits between them here (each page
        they touch is written once, not once per step: ~3.5 % fewer bytes in a first
        scan of 1,000,000 files)."""
        summary, indexing = self._record_scan(classify(found, self._recorded_content), started)
        with self.db.conn:
            for step in self._index_steps(indexing):
                step()
        return summary

    async def scan_off_loop(
        self,
        paths: Collection[str] | None = None,
        progress: ProgressCallback | None = None,
        recorded: Callable[[], None] | None = None,
    ) -> ScanSummary:
        """:meth:`scan` for a process that runs an event loop: the walk, the stats and
        the hashing happen in a worker thread (through a read connection of its own),
        only the recording in the loop. Before recording, each path's lstat and scan
        cache entry must still be what the walk saw: a path that an apply wrote in the
        meantime, or that changed again, is scanned again instead of being recorded
        from stale bytes (at most RESCANS times; then it is left to the next scan).

        ``recorded`` is called as soon as new versions are in the journal (the node
        pushes them); the chunk index follows, one file per step, the loop free between
        steps to answer peers (their chunk requests wait for it: :attr:`indexing`)."""
        if self.repairing:
            return ScanSummary(waiting="the share is being repaired")
        if (moved := self.root_moved()) is not None:
            return ScanSummary(waiting=moved)
        self._remove_left_placeholders()
        started = time.monotonic()
        total = ScanSummary()
        for _ in range(RESCANS):
            behind = self.own_events_missing
            found = await self._look_apart(paths, progress)
            if behind and not self.own_events_missing:
                # its own events came back during the walk, which compared the disk with
                # the older copy's scan cache: a file of theirs that the person deleted was
                # in neither, and its deletion would go unrecorded until a whole scan
                found = await self._look_apart(paths, progress)
            stale = self._drop_stale(classify(found, self._recorded_content))
            summary, indexing = self._record_scan(found, started)  # in the same step as the check
            if summary.waiting is not None:
                return summary
            await self._index_apart(indexing, recorded if summary.events else None)
            _add_summary(total, summary)
            if not stale:
                break
            paths = stale
        else:
            problems = [Problem(p, "kept changing while being scanned; will retry") for p in stale]
            total.errors += problems
        total.seconds = time.monotonic() - started
        return total

    async def _index_apart(self, indexing: Indexing, recorded: Callable[[], None] | None) -> None:
        """Call ``recorded``, then write a recorded scan's chunk index a step at a time,
        letting the loop run for INDEX_PAUSE_S between steps (a peer's request for the
        pushed manifests takes several turns of it); peers' chunk requests wait from the
        first step until the last (:attr:`indexing`)."""
        self.indexing = True
        try:
            if recorded is not None:
                recorded()
            for step in self._index_steps(indexing):
                await asyncio.sleep(INDEX_PAUSE_S)
                with self.db.conn:
                    step()
        finally:
            self.indexing = False

    def _index_steps(self, indexing: Indexing) -> Iterator[Callable[[], None]]:
        """The writes of :class:`Indexing` in steps of about INDEX_STEP_ROWS chunk
        rows, each for the caller to commit (alone, or all at once): files' locations
        with their settled scan-cache entries, then the kept contents' locations at
        their store entries. A file whose scan-cache entry is no longer the one the
        recording wrote (an apply or a restore wrote it since, with its own) is left as
        it is."""
        store = Store(self.root, self.catalog)

        def index_files(files: list[tuple[LocalEntry, Manifest]]) -> None:
            now = self.catalog.local_entries([entry.path for entry, _ in files])
            files = [f for f in files if now.get(f[0].path) == f[0]._replace(settled=False)]
            self.catalog.put_chunk_locations((entry.path, m) for entry, m in files)
            self.catalog.set_local(entry for entry, _ in files)

        def register(contents: list[bytes]) -> None:
            for content in contents:
                store.register(content)

        def rows_of(content: bytes) -> int:
            manifest = self.catalog.manifest(content)
            return len(manifest.chunks) if manifest is not None else 0

        for files in _steps(indexing.files, lambda f: len(f[1].chunks)):
            yield functools.partial(index_files, files)
        for contents in _steps(indexing.kept, rows_of):
            yield functools.partial(register, contents)

    async def _look_apart(
        self, paths: Collection[str] | None, progress: ProgressCallback | None
    ) -> Observation:
        """:func:`look` in a worker thread; cancelled, it stops that thread at its next
        file or directory."""
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        database = self.root / METADATA_DIR / DB_FILE
        shown = _Throttled(loop, progress) if progress is not None else None

        def work() -> Observation:
            uri = f"file:{urllib.parse.quote(os.fspath(database))}?mode=ro"
            with contextlib.closing(sqlite3.connect(uri, uri=True)) as reader:
                scratch_in_memory(reader)
                local_for = functools.partial(read_local, reader)
                local_after = functools.partial(read_local_after, reader)
                names_of = functools.partial(read_local_names, reader)
                return look(
                    self.root,
                    local_for,
                    paths,
                    shown,
                    stop=stop,
                    local_after=local_after,
                    names_of=names_of,
                )

        try:
            return await loop.run_in_executor(None, work)
        except asyncio.CancelledError:
            stop.set()
            raise

    def _drop_stale(self, found: Observation) -> list[str]:
        """Take out of ``found`` every path whose scan cache entry or lstat is no longer
        what the walk saw (an apply wrote it, or it changed again); return them."""
        on_disk = {seen.path: seen.stat_key for seen, _, _ in found.changed}
        on_disk.update((entry.path, entry.stat_key) for entry in found.refreshed)
        touched = [*on_disk, *found.deleted, *found.forgotten]
        now = self.catalog.local_entries(touched)
        stale = {path for path in touched if now.get(path) != found.local.get(path)}
        for path, key in on_disk.items():
            try:
                same = stat_key_of(os.lstat(self.root / path)) == key
            except OSError:
                same = False
            if not same:
                stale.add(path)
        stale.update(p for p in found.deleted if os.path.lexists(self.root / p))
        if stale:
            found.changed = [c for c in found.changed if c[0].path not in stale]
            found.refreshed = [e for e in found.refreshed if e.path not in stale]
            found.reindexed = [r for r in found.reindexed if r[0] not in stale]
            found.deleted = [p for p in found.deleted if p not in stale]
            found.forgotten = [p for p in found.forgotten if p not in stale]
        return sorted(stale)

    def _record_scan(self, found: Observation, started: float) -> tuple[ScanSummary, Indexing]:
        """Record what a scan found (see :meth:`scan`); nothing if the folder was
        moved away during the walk. The chunk index of the new files is left to the
        caller (:class:`Indexing`)."""
        if (moved := self.root_moved()) is not None:
            return ScanSummary(waiting=moved), Indexing()
        local = found.local
        waiting = self.behind_itself if self.own_events_missing else None
        if not self.members:  # a joiner: its log must not start before genesis,
            waiting = WAITING_FOR_GENESIS  # or it could not be relayed
        if waiting is not None:  # record nothing; still say where chunks are for peers
            with self.db.conn:
                self.catalog.put_manifests(found.reindexed)
                self.catalog.put_manifests((s.path, m) for s, m, _ in found.changed if m)
            self._sweep(found.leftovers)
            return ScanSummary(waiting=waiting), Indexing()
        summary = ScanSummary(
            errors=found.errors, unchanged=found.unchanged, hashed_bytes=found.hashed_bytes
        )
        now_ms = self.now_ms()
        device = self.device[:8]
        changed = sorted(found.changed, key=lambda c: c[0].path)
        live = self.catalog.live_for([seen.path for seen, _, _ in changed] + found.deleted)
        basis = self.catalog.forgotten_basis(s.path for s, _, _ in changed if s.path not in local)
        adopting = changed
        changed = self._adopt_identical(changed, local, live, basis, found, found.observed_ns)
        applied = self._applied_deletions(found.deleted, local, live)
        found.deleted = [path for path in found.deleted if path not in applied]
        changed = self._only_changed_parents(adopting, changed, local, found, applied)
        versions: list[tuple[str, Version]] = []
        # A local change supersedes only the version the disk held (the cached one, or
        # for a path no longer ignored the one it held when the rule came): remote
        # versions this device has not written yet are concurrent with it.
        for seen, _, content in changed:
            existed = any(v.kind != Kind.DELETED for v in live.get(seen.path, {}).values())
            (summary.modified if existed else summary.added).append(seen.path)
            version = _version_of(seen, content, permissions_of(found, seen), device, now_ms)
            held = basis.get(seen.path)
            version.supersedes = (held,) if held else _based_on(local.get(seen.path))
            versions.append((seen.path, version))
        vanished = self._deleted_while_ignored(found)
        for path in [*found.deleted, *vanished]:
            summary.deleted.append(path)
            based_on = (vanished[path],) if path in vanished else _based_on(local.get(path))
            versions.append(
                (path, Version(Kind.DELETED, device=device, time_ms=now_ms, supersedes=based_on))
            )
        position = self.journal.position()
        kept, rewritten = self._replaced_contents(changed, found, applied)
        with self.db.conn:  # noted before the events that replace them (see _keep_recorded)
            self.catalog.put_manifest_bodies(m for _, m, _ in changed if m is not None)
            Store(self.root, self.catalog).to_register(kept)
        indexing = Indexing()
        seen_at = {seen.path: (seen, manifest) for seen, manifest, _ in changed}

        def settle(assigned: dict[str, str]) -> None:
            cache = []
            for path, version_id in assigned.items():
                if path not in seen_at:
                    continue
                seen, manifest = seen_at[path]
                entry = cache_entry(path, version_id, seen.stat_key, found.observed_ns)
                if manifest is not None:
                    indexing.files.append((entry, manifest))
                    entry = entry._replace(settled=False)
                cache.append(entry)
            self.catalog.set_local(cache)
            self.catalog.drop_local([path for path in assigned if path not in seen_at])

        self.commit(versions, settle)
        summary.events = self.journal.position() - position
        with self.db.conn:
            self.catalog.set_local(found.refreshed)
            self.catalog.put_manifests(found.reindexed)
            self.catalog.forget(local[path] for path in found.forgotten)
            self.catalog.drop_local(applied)
            self.catalog.drop_forgotten(
                [seen.path for seen, _, _ in changed]
                + [e.path for e in found.refreshed]
                + list(vanished)
            )
            self.catalog.set_meta("last_scan_ms", now_ms)
            summary.fresh = self._note_scan_problems(found) if found.final else []
            recorded = [seen.path for seen, _, _ in changed] + found.deleted
            self._note_problems("apply", [], resolved=recorded)  # the disk's version won
            self._keep_recorded(changed, found, rewritten)
            indexing.kept = kept
        if found.final:  # (the document grows with the share: saved once per scan)
            self.save_snapshot()
            self._sweep(found.leftovers)
            self.rescan_due = self.rescan_due and found.scope is not None
        summary.seconds = time.monotonic() - started
        return summary, indexing

    def _replaced_contents(
        self,
        changed: list[tuple[Seen, Manifest | None, bytes]],
        found: Observation,
        applied: list[str],
    ) -> tuple[list[bytes], list[tuple[bytes, int]]]:
        """The contents a scan's record replaces or deletes: those whose chunk locations
        go to their store entries (:meth:`Store.register`, part of :class:`Indexing`),
        and (content, inode) of those rewritten in place, whose kept bytes went with the
        file. So go the contents of paths that became ignored: nothing watches those
        files any more, and a version they held may still be needed (its conflict copy,
        once the rule goes) with the store's entry its only copy; and so do those of the
        ``applied`` deletions and of the versions an adopted one replaced. A file
        rewritten in place whose entry is not its inode (a copy, where the filesystem
        has no hard links; another file's bytes) still holds them: it is kept."""
        inodes = {seen.path: seen.inode for seen, _, _ in changed}
        adopted = {  # a version that replaced the recorded one, put in place by a window
            e.path: e.inode  # killed before its commit (R41): the old one is replaced too
            for e in found.refreshed
            if (old := found.local.get(e.path)) is not None and old.version_id != e.version_id
        }
        kept, rewritten, now = [], [], inodes | adopted
        store = Store(self.root, self.catalog)
        for path in [*inodes, *found.deleted, *found.forgotten, *applied, *adopted]:
            old = found.local.get(path)
            previous = self.catalog.version(old.version_id) if old is not None else None
            if old is None or previous is None or previous.kind != Kind.FILE:
                continue
            if now.get(path) == old.inode and not store.holds_apart(previous.content, old.inode):
                rewritten.append((previous.content, old.inode))
            else:
                kept.append(previous.content)
        return kept, rewritten

    def _keep_recorded(
        self,
        changed: list[tuple[Seen, Manifest | None, bytes]],
        found: Observation,
        rewritten: list[tuple[bytes, int]],
    ) -> None:
        """The content store after a recorded scan (best effort: a link that cannot be
        made costs a kept version, never a file): each file as recorded now is kept by
        a hard link, so that when the person later replaces or deletes it, its bytes
        are still here; an entry of a file ``rewritten`` in place goes. The contents to
        register at their entries were noted before the scan's events, in a transaction
        of their own (:meth:`_replaced_contents`): noted with the rest of the scan's
        cache, after those events and the entries they drop, a process killed in
        between left the kept bytes where no read found them, and no later scan knew of
        them (R48)."""
        store = Store(self.root, self.catalog)
        for content, inode in rewritten:
            store.edited_in_place(content, inode)
        store.keep_files((s.path, c, s.size, s.inode) for s, _, c in changed if s.kind == Kind.FILE)
        store.keep_entries(found.refreshed)

    def _deleted_while_ignored(self, found: Observation) -> dict[str, str]:
        """Paths no longer ignored that are gone from the disk, with the version this
        device held when the rule came, if nothing else replaced it (it is live, or
        carried by its conflict copy): the person deleted it meanwhile, which is this
        device's deletion of that version (an edit made meanwhile is its edit, see
        :meth:`_adopt_identical`). Left standing, it would be asked of every device with
        its bytes on no disk. Whole scans only (once: with their last batch); a path that
        cannot be looked at is not taken for gone."""
        if found.scope is not None or not found.final:
            return {}
        rules, vanished = IgnoreRules.load(self.root), {}
        forgotten = self.catalog.all_forgotten()
        cached = self.catalog.local_entries(forgotten)  # found.local: only what changed
        for path, held in forgotten.items():
            version = self.catalog.version(held)
            is_dir = version is not None and version.kind == Kind.DIRECTORY
            if version is None or rules.excluded(path, is_dir) or path in cached:
                continue
            try:
                os.lstat(self.root / path)
                continue
            except FileNotFoundError:
                pass
            except OSError:
                continue
            if not self.catalog.superseded_by_other_than(held, copy_version_id(held)):
                vanished[path] = held
        return vanished

    def _note_scan_problems(self, found: Observation) -> list[Problem]:
        """A whole scan's problems replace the last ones; a scan of some paths resolves
        only the earlier problems of those paths (and below) that it did not see again."""
        if found.scope is None:
            return self._note_problems("scan", found.errors, replace=True)
        tops = set(found.scope)
        earlier = [p.path for _, p, _ in self.catalog.problems("scan") if under_any(p.path, tops)]
        return self._note_problems("scan", found.errors, resolved=earlier)

    def note_planned(self, paths: Container[str]) -> None:
        """A path that failed to apply and is no longer in the plan needs nothing any
        more (deleted or superseded elsewhere, or now as the state says): resolved. One
        left out as unwritable stays reported."""
        kept = {path for path, _ in self.unwritable}
        stale = [
            p.path
            for _, p, _ in self.catalog.problems("apply")
            if p.path not in kept and p.path not in paths
        ]
        if stale:
            with self.db.conn:
                self._note_problems("apply", [], stale)

    def note_applied(self, report: Report) -> None:
        """Keep the problems of one applied window; a path written or deleted is fine.
        A version that failed for a lasting local reason is not planned again (in this
        process: a restart tries once more)."""
        self.unwritable.update(report.unwritable)
        done = report.written + report.deleted
        try:
            with self.db.conn:
                self._note_problems("apply", report.errors, done)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
                raise
            # the disk that stopped the window has no room for its problems either: this
            # process still tells them (log, warning, summary); status once there is room
            self._tally("apply", report.errors, report.errors, done)

    def _note_problems(
        self,
        source: str,
        problems: list[Problem],
        resolved: list[str] | None = None,
        replace: bool = False,
    ) -> list[Problem]:
        """Record problems in the catalog (``status`` lists them until resolved) and in
        this process's tally (a command's summary and exit status); the fresh ones."""
        fresh = self.catalog.note_problems(
            source, problems, entropy.now_ms(), resolved or (), replace
        )
        self._tally(source, problems, fresh, resolved or (), replace)
        return fresh

    def _tally(
        self,
        source: str,
        problems: list[Problem],
        fresh: list[Problem],
        resolved: Iterable[str] = (),
        replace: bool = False,
    ) -> None:
        """This process's tally of problems (a command's summary and exit status, the
        node's log), whether or not the catalog could record them."""
        if replace:
            self.problems = {k: p for k, p in self.problems.items() if k[0] != source}
        for path in resolved:
            self.problems.pop((source, path), None)
        self.problems.update(((source, p.path), p) for p in problems)
        self.fresh_problems += fresh

    def _sweep(self, leftovers: list[str]) -> None:
        """Remove the temp files a scan found that nothing will use, judged by what is
        live once the scan is recorded (we hold the lock: only our own writes run)."""
        self.resumable_temps.update(Path(p) for p in leftovers)
        self.sweep_resumable()

    def sweep_resumable(self) -> None:
        """Remove the kept temp files (of interrupted or incomplete writes) that nothing
        will use any more: the version each was for is no longer to be written here.
        Run after every scan and every plan, so none outlives its version."""
        stale = stale_temps(self.root, self.catalog, self.resumable_temps, self.temps_in_use)
        for leftover in stale:
            discard_temp(leftover)
        self.resumable_temps.difference_update(stale)

    def _adopt_identical(
        self,
        changed: list[tuple[Seen, Manifest | None, bytes]],
        local: dict[str, LocalEntry],
        live: dict[str, dict[str, Version]],
        basis: dict[str, str],
        found: Observation,
        now_ns: int,
    ) -> list[tuple[Seen, Manifest | None, bytes]]:
        """An entry this device has no record of (a path no longer ignored, a file put
        in place by hand) that is identical to a live version, or to the version it held
        when it became ignored, is that version: it is adopted into the scan cache
        instead of recorded again (a newer live version then simply replaces it, as any
        received version does). But a file that no longer holds the version it held
        when the rule came, while nothing else replaced that version (it is live, or
        carried by its conflict copy), is this device's edit of it, whatever its bytes
        equal: adopting another version would leave the old one standing with its bytes
        on no disk. A recorded path identical to a live version that replaced the one
        recorded there (a window killed between moving a received file into place and
        writing its cache entry) is that version too, not an edit beside it (R41); so is
        one identical to any live version once the recorded one is no longer live there
        (a conflict copy carries it: the window moved the winner into place), unless it
        is the recorded file rewritten in place: the person's edit of the version the
        copy carries, whose bytes went with it. An unrecorded path where something is
        live, identical to a version once there that a live version replaced or its
        live conflict copy carries, is that version (a window planned before the newer
        version or the conflict came, killed before its cache; :meth:`_moved_on_from`).
        The rest is returned."""
        remaining, kept_bits = [], found.permissions_kept
        for seen, manifest, content in changed:
            wanted = (seen.kind, content, permissions_of(found, seen))
            candidates = dict(sorted(live.get(seen.path, {}).items()))
            if seen.path in local:
                recorded = local[seen.path].version_id
                # (a file rewritten in place is the person's edit of the recorded one)
                moved = seen.inode != local[seen.path].inode
                moved_on = moved and self._moved_on(recorded, candidates)
                candidates = {
                    vid: v
                    for vid, v in candidates.items()
                    if same_entry(v, wanted, kept_bits)
                    and (moved_on or self._replaced(recorded, v))
                }
            else:
                held = basis.get(seen.path)
                version = self.catalog.version(held) if held else None
                if held and version is not None:
                    replaced = self.catalog.superseded_by_other_than(held, copy_version_id(held))
                    kept = same_entry(version, wanted, kept_bits)
                    if not kept and not replaced:
                        candidates = {}  # an edit of what it held
                    candidates.setdefault(held, version)
            same = next(
                (
                    vid
                    for vid, v in candidates.items()
                    if same_entry(v, wanted, kept_bits)
                ),
                None,
            )
            if same is None and seen.path not in local and seen.path in live:
                same = next(
                    (
                        vid
                        for vid, v in self._moved_on_from(seen.path, live[seen.path]).items()
                        if same_entry(v, wanted, kept_bits)
                    ),
                    None,
                )
            if same is None:
                remaining.append((seen, manifest, content))
                continue
            found.refreshed.append(cache_entry(seen.path, same, seen.stat_key, now_ns))
            if manifest is not None:
                found.reindexed.append((seen.path, manifest))
        return remaining

    def _moved_on_from(self, path: str, live: dict[str, Version]) -> dict[str, Version]:
        """The versions once at ``path`` that the state has moved on from: replaced by a
        version ``live`` there, or carried by a live conflict copy. A window planned
        while one was live there writes it even if a newer version or a conflict has
        since come (a plan is applied as planned; the next one corrects the disk);
        killed before its cache entry, the file is that version, not this device's edit
        beside what is live: adopted, it is replaced as any recorded version is, its
        bytes kept (and live at the copy) whoever wrote them. Never one a deletion
        replaced: the person who restores a deleted file from a backup made a new file,
        which adopted would be deleted again by the next window."""
        return {
            vid: version
            for at, vid, version in self.catalog.versions_under(path)
            if at == path
            and vid not in live
            and (
                any(
                    newer.kind != Kind.DELETED and self._replaced(vid, newer)
                    for newer in live.values()
                )
                or copy_version_id(vid) in self.catalog.live_versions(conflict_path(path, version))
            )
        }

    def _applied_deletions(
        self, deleted: list[str], local: dict[str, LocalEntry], live: dict[str, dict[str, Version]]
    ) -> list[str]:
        """The paths gone from the disk whose deletion is already recorded (a received or
        restored deletion applied, its process killed before the cache entry went):
        a live deletion replaced the version the scan cache names there, or that
        version went elsewhere (a conflict copy carries it) and nothing but deletions
        is live at the path. Recorded again, it would be this device's second deletion
        of one version, or a deletion of one no longer live, beside the first; its
        cache entry goes instead (as R41 adopts a received file)."""
        return [
            path
            for path in deleted
            if path in local and self._deletion_recorded(local[path].version_id, live.get(path, {}))
        ]

    def _deletion_recorded(self, recorded: str, live: dict[str, Version]) -> bool:
        """Whether the state already has the path deleted whose scan cache names
        ``recorded`` (``live``: the path's live versions); see :meth:`_applied_deletions`."""
        deletions = [v for v in live.values() if v.kind == Kind.DELETED]
        if any(self._replaced(recorded, v) for v in deletions):
            return True
        return self._moved_on(recorded, live) and len(deletions) == len(live)

    def _moved_on(self, recorded: str, live: dict[str, Version]) -> bool:
        """Whether the version a scan-cache entry names, ``recorded``, is a version this
        device knows that is no longer live at its path (``live``: the path's live
        versions): replaced, or carried by its conflict copy. What the disk holds there
        was then put there for the versions that are (a window or restore killed before
        its commit), or is the person's edit of what is live, not of ``recorded``."""
        return recorded not in live and self.catalog.version(recorded) is not None

    def _replaced(self, recorded: str, version: Version) -> bool:
        """Whether ``version`` replaced ``recorded``, directly or through versions since
        replaced (looking at MAX_ANCESTRY of them at most)."""
        looked, pending = set(), list(version.supersedes)
        while pending and len(looked) < MAX_ANCESTRY:
            older = pending.pop()
            if older == recorded:
                return True
            if older not in looked:
                looked.add(older)
                ancestor = self.catalog.version(older)
                pending += ancestor.supersedes if ancestor is not None else ()
        return False

    def _only_changed_parents(
        self,
        before: list[tuple[Seen, Manifest | None, bytes]],
        changed: list[tuple[Seen, Manifest | None, bytes]],
        local: dict[str, LocalEntry],
        found: Observation,
        applied: list[str],
    ) -> list[tuple[Seen, Manifest | None, bytes]]:
        """A directory recorded again only for its new mtime (the walk saw an entry of it
        change) keeps its version when each such entry was adopted or is an ``applied``
        deletion: an entry that is a live version, or a removal already recorded, is no
        change, and the mtime moved by it (a missing parent a waiting window made, a
        path no longer ignored, a file a window or restore killed before its commit
        removed) would otherwise reach every peer as an edit nobody made. A directory
        that keeps its version so is such an entry of its own parent: the deepest are
        looked at first, so ``a`` keeps its version when ``a/c`` did for a removal in
        it. Its cache entry takes the new mtime. (``before``: the changes before
        adoption.) The rest is returned."""
        kept = {seen.path for seen, _, _ in changed}
        adopted = {s.path.rpartition("/")[0] for s, _, _ in before if s.path not in kept}
        adopted.update(path.rpartition("/")[0] for path in applied)
        changing = Counter(path.rpartition("/")[0] for path in kept | set(found.deleted))
        unchanged: set[str] = set()
        for seen, _, content in sorted(changed, key=lambda c: -c[0].path.count("/")):
            cached = local.get(seen.path)
            if (
                seen.kind == Kind.DIRECTORY
                and seen.path in adopted
                and not changing[seen.path]
                and cached is not None
                and self._recorded_content(cached)
                == (seen.kind, content, permissions_of(found, seen))
            ):
                entry = cache_entry(seen.path, cached.version_id, seen.stat_key, found.observed_ns)
                found.refreshed.append(entry)
                unchanged.add(seen.path)
                parent = seen.path.rpartition("/")[0]
                changing[parent] -= 1
                adopted.add(parent)
        return [change for change in changed if change[0].path not in unchanged]

    def _recorded_content(self, entry: LocalEntry) -> tuple[Kind, bytes, int] | None:
        version = self.catalog.version(entry.version_id)
        if version is None:
            return None
        return version.kind, version.content, version.permissions


class _Throttled:
    """A progress callback for a worker thread: hands the loop at most one report every
    PROGRESS_EVERY seconds (and always the last), to run there."""

    def __init__(self, loop: asyncio.AbstractEventLoop, progress: ProgressCallback) -> None:
        self.loop, self.progress, self.last = loop, progress, 0.0

    def __call__(self, files_done: int, files: int, done: int, total: int) -> None:
        now = time.monotonic()
        if files_done == files or now - self.last >= PROGRESS_EVERY:
            self.last = now
            self.loop.call_soon_threadsafe(self.progress, files_done, files, done, total)


def _steps(items: list[_Item], rows: Callable[[_Item], int]) -> Iterator[list[_Item]]:
    """``items`` in runs of about INDEX_STEP_ROWS rows (at least one item each)."""
    step: list[_Item] = []
    size = 0
    for item in items:
        if step and size + rows(item) > INDEX_STEP_ROWS:
            yield step
            step, size = [], 0
        step.append(item)
        size += rows(item)
    if step:
        yield step


def _add_summary(total: ScanSummary, part: ScanSummary) -> None:
    """Fold one round of an off-loop scan into the whole scan's summary."""
    for name in ("added", "modified", "deleted", "errors", "fresh"):
        getattr(total, name).extend(getattr(part, name))
    total.unchanged += part.unchanged
    total.hashed_bytes += part.hashed_bytes
    total.events += part.events


def _check_event(event: Event) -> None:
    """Raise :class:`BadUpdate` for an event kind this version does not know, a time
    outside what can be shown, or a membership payload of the wrong size."""
    try:
        kind = EventKind(event.kind)
    except ValueError as exc:
        raise BadUpdate(f"unknown event kind {event.kind}") from exc
    if event.time_ms > MAX_TIME_MS:
        raise BadUpdate(f"event time {event.time_ms} ms is out of range")
    low, high = _PAYLOAD_BYTES.get(kind, (0, MAX_PAYLOAD))
    if not low <= len(event.payload) <= high:
        raise BadUpdate(f"a {kind.name.lower()} event of {len(event.payload)} bytes")
    if kind == EventKind.UNHELD and len(event.payload) % CONTENT_ID_BYTES:
        raise BadUpdate(f"an unheld event of {len(event.payload)} bytes")


def unheld_contents(payload: bytes) -> list[bytes]:
    """The content ids of an UNHELD event's payload."""
    return [payload[i : i + CONTENT_ID_BYTES] for i in range(0, len(payload), CONTENT_ID_BYTES)]


def _based_on(cached: LocalEntry | None) -> tuple[str, ...]:
    return (cached.version_id,) if cached is not None else ()


def same_entry(version: Version, wanted: tuple[Kind, bytes, int], bits_kept: bool) -> bool:
    """Whether ``version`` is what a scan found (``wanted``: kind, content, permission
    bits). Where the disk keeps no bits (``bits_kept`` False) any version's are the file's:
    adoption and ``backer repair``'s recognition must not tell versions apart by them."""
    if bits_kept:
        return (version.kind, version.content, version.permissions) == wanted
    return (version.kind, version.content) == wanted[:2]


def _version_of(
    seen: Seen, content: bytes, permissions: int, device: bytes, now_ms: int
) -> Version:
    return Version(
        seen.kind,
        seen.size,
        seen.mtime_ns,
        permissions,
        content,
        device,
        now_ms,
    )
