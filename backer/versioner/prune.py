"""Apply the retention policy to a share's content store (``backer prune``, and the node
every hour).

The journal keeps every version's metadata for ever; only bytes go. A store entry
stays while a version the policy keeps needs it, or while a file of the share holds
that content (live here, or on disk as recorded: it costs nothing then). Every other
entry is removed, and the versions whose bytes went with it are noted (table
``pruned``), so ``history`` can say when. The contents of replaced versions this device
no longer holds (pruned, or never had) are then announced to every device in signed
UNHELD events, so ``history`` anywhere can say when a version's bytes are on no device.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlite_utils

from backer.db.catalog import Catalog
from backer.model import entropy
from backer.model.records import Kind, Version
from backer.model.share import DB_FILE, METADATA_DIR
from backer.versioner.config import policy as share_policy
from backer.versioner.retention import DAY, MINUTE, Candidate, Policy, retained
from backer.versioner.store import Store

if TYPE_CHECKING:
    from backer.model.share import Share

# A clock further than this past the newest event of the journal (any device's) is not
# believed for ages: it jumped ahead (an RTC reset, an NTP step), or the share is idle.
MAX_AHEAD_MS = DAY
# ``backer prune --all``: no version keeps its bytes, not even the last hour's (a full disk
# that deleting files cannot relieve, since what is deleted is kept)
DROP_ALL = Policy(keep_all_ms=0, hourly_until_ms=0, daily_until_ms=0, weekly_until_ms=0)
STOP_CHECK_STEPS = 10_000  # a survey checks for a stop every this many SQLite steps
# A version recorded here later than this after its author's time ages from when it was
# recorded here, less this: the author's clock may be behind (an online peer's change
# arrives within seconds; one that was offline is kept longer, never shorter)
LATE_MS = MINUTE
CLOCK_KEY = "prune.clock"  # meta: boot id, ns since boot, wall ms, ms the wall is ahead by


@dataclass
class PruneReport:
    files: int = 0  # store entries removed (or that would be)
    bytes: int = 0  # disk space that frees
    versions: int = 0  # versions whose bytes go
    kept_files: int = 0  # store entries left
    kept_bytes: int = 0  # what those cost beyond the share's own files
    cap: int = 0  # the size cap applied, in bytes
    dry_run: bool = False
    announced: int = 0  # UNHELD events recorded (contents other devices learn are not here)
    unheld: set[bytes] = field(default_factory=set, repr=False)  # replaced contents not here

    def as_json(self) -> dict[str, Any]:
        """What ``backer prune --json`` prints (and the node's ``prune`` answer)."""
        shown = dataclasses.asdict(self)
        del shown["unheld"]
        return shown


def learned_time(time_ms: int, recorded_ms: int | None) -> int:
    """An author's ``time_ms`` for a change this device recorded at ``recorded_ms`` (by
    its own clock), believed only within :data:`LATE_MS` before that and never after
    (a row older than the column: the author's time)."""
    if recorded_ms is None:
        return time_ms
    return min(max(time_ms, recorded_ms - LATE_MS), recorded_ms)


def replaced_at(catalog: Catalog) -> dict[str, int]:
    """When each superseded version stopped being current: the time of the earliest
    recorded version that supersedes it, but never more than :data:`LATE_MS` before
    this device recorded that version, nor after it (by its own clock, not the
    author's: a device whose clock was reset to the past made every device drop at once
    what it replaced, R36; one whose clock was once years ahead dates its edits at that
    time until it passes, and made every device keep what they replaced, inside
    keep-all, for years, R49). Read joined in SQL: only the superseded versions are
    held."""
    replaced: dict[str, int] = {}
    rows = catalog.conn.execute(
        "SELECT s.old, v.record, s.recorded_ms FROM supersedes s JOIN versions v ON v.vid = s.new"
    )
    for old, record, recorded_ms in rows:
        time_ms = learned_time(Version.decode(record).time_ms, recorded_ms)
        replaced[old] = min(replaced.get(old, time_ms), time_ms)
    return replaced


def candidates(
    catalog: Catalog, held: dict[bytes, int]
) -> tuple[list[Candidate], set[bytes], set[bytes], int]:
    """The replaced and deleted file versions whose content the store holds, each with
    the time it stopped being current; the contents this device's files hold (live
    versions, and what the disk held at the last scan); the contents of every
    replaced or deleted file version; and the time of the newest version recorded.

    The versions are read as one stream, each marked live or on disk by SQL, and only
    what the answer needs is held: holding every decoded version, the live set and the
    scan cache at once cost ~1.1 KB per file (the node's peak, after its start-up)."""
    replaced = replaced_at(catalog)
    found: list[Candidate] = []
    free: set[bytes] = set()
    retired: set[bytes] = set()
    newest = 0
    rows = catalog.conn.execute(
        "SELECT vid, path, record, vid IN (SELECT vid FROM live), "
        "vid IN (SELECT vid FROM local WHERE vid IS NOT NULL), recorded_ms FROM versions"
    )
    for vid, path, record, live, on_disk, recorded_ms in rows:
        version = Version.decode(record)
        newest = max(newest, version.time_ms)
        if version.kind != Kind.FILE:
            continue
        if live or on_disk:
            free.add(version.content)
        if live:
            continue
        retired.add(version.content)
        if version.content in held:
            since_ms = replaced.get(vid)
            if since_ms is None:  # (not current, though nothing this device holds replaced it)
                since_ms = learned_time(version.time_ms, recorded_ms)
            found.append(Candidate(vid, path, since_ms, version.content, version.size))
    return found, free, retired, newest


@dataclass(frozen=True)
class Survey:
    """What a prune decides on, read from the catalog: every content the store holds
    with its size, and :func:`candidates` of them."""

    held: dict[bytes, int]
    found: list[Candidate]
    free: set[bytes]
    retired: set[bytes]
    newest_ms: int


def survey(catalog: Catalog) -> Survey:
    """Read and decode every recorded version (seconds on a large share: the node does
    it in a worker thread, on a connection of its own: :func:`survey_apart`)."""
    held = dict(catalog.conn.execute("SELECT content, size FROM store"))
    return Survey(held, *candidates(catalog, held))


@contextlib.contextmanager
def read_apart(root: Path, stop: threading.Event | None = None) -> Iterator[Catalog]:
    """The share's catalog on a read-only connection of its own, for a worker thread
    (WAL: the loop's writes neither wait for it nor are seen half-made); once ``stop``
    is set its next query step raises (a node stopping must not wait for it: shutting
    down waits for its worker threads)."""
    database = os.fspath(root / METADATA_DIR / DB_FILE)
    uri = f"file:{urllib.parse.quote(database)}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, check_same_thread=False)) as conn:
        if stop is not None:
            conn.set_progress_handler(stop.is_set, STOP_CHECK_STEPS)
        yield Catalog(sqlite_utils.Database(conn, execute_plugins=False), migrate=False)


def survey_apart(root: Path, stop: threading.Event | None = None) -> Survey:
    """:func:`survey` through :func:`read_apart`."""
    with read_apart(root, stop) as catalog:
        return survey(catalog)


def prune(
    root: Path,
    catalog: Catalog,
    now_ms: int,
    dry_run: bool = False,
    policy: Policy | None = None,
    surveyed: Survey | None = None,
) -> PruneReport:
    """Remove (or with ``dry_run`` only count) the store entries the share's policy no
    longer needs; the caller commits. Versions age by ``now_ms`` unless it is more than
    :data:`MAX_AHEAD_MS` past the newest version recorded: then by that version's time,
    so a clock that jumped ahead drops nothing an earlier prune would not have (the
    time is believed once an event made then shows it). ``surveyed``: the catalog read
    beforehand, by a caller that knows nothing changed since."""
    store = Store(root, catalog)
    found_out = surveyed or survey(catalog)
    held, found, free = found_out.held, found_out.found, found_out.free
    retired, newest_ms = found_out.retired, found_out.newest_ms
    policy = policy or share_policy(catalog)
    used = sum(size for content, size in held.items() if content not in free)
    stat = os.statvfs(root)
    cap = int(policy.max_disk * (stat.f_bavail * stat.f_frsize + used))
    age_ms = aging_time(catalog, now_ms, newest_ms, dry_run)
    keep = retained(found, age_ms, policy, cap, free)
    needed = free | {c.content for c in found if c.version_id in keep}
    report = PruneReport(cap=cap, dry_run=dry_run)
    doomed = [content for content in held if content not in needed]
    for content in doomed:
        report.files += 1
        report.bytes += store.freed_by_removing(content)
        if not dry_run:
            store.remove(content)
    gone = set(doomed)
    dropped = [c.version_id for c in found if c.content in gone]
    report.versions = len(dropped)
    report.kept_files = len(held) - len(doomed)
    report.kept_bytes = sum(held[c] for c in held if c not in gone and c not in free)
    if not dry_run:
        store.note_pruned(dropped, now_ms)
    report.unheld = {c for c in retired if c not in free and (c not in held or c in gone)}
    return report


def aging_time(catalog: Catalog, now_ms: int, newest_ms: int, dry_run: bool = False) -> int:
    """The time versions age by at ``now_ms``. Within one boot the wall clock must move
    with the boot clock: what it gained beyond that since the last prune (by more than
    :data:`MAX_AHEAD_MS`: a jump, not a slew) is taken off, for as long as it lasts,
    since the versions this device records meanwhile carry the jumped time and so show
    nothing (R33). Then, as for a new boot, a time more than :data:`MAX_AHEAD_MS` past
    the newest version recorded is not believed (R31). A real prune notes the clocks."""
    boot = entropy.since_boot()
    ahead = 0
    noted = catalog.get_meta(CLOCK_KEY)
    if boot is not None and noted is not None:
        with contextlib.suppress(ValueError):  # (a note we did not write: none)
            text = noted.decode() if isinstance(noted, bytes) else str(noted)
            boot_id, boot_ns, wall_ms, ahead_ms = text.rsplit(" ", 3)
            if boot_id == boot[0]:
                gained = now_ms - int(wall_ms) - (boot[1] - int(boot_ns)) // 1_000_000
                ahead = int(ahead_ms) + (gained if abs(gained) > MAX_AHEAD_MS else 0)
                ahead = max(0, ahead)
    if boot is not None and not dry_run:
        catalog.set_meta(CLOCK_KEY, f"{boot[0]} {boot[1]} {now_ms} {ahead}")
    age_ms = now_ms - ahead
    return newest_ms if 0 < newest_ms < age_ms - MAX_AHEAD_MS else age_ms


def prune_share(
    share: Share,
    now_ms: int,
    dry_run: bool = False,
    policy: Policy | None = None,
    surveyed: Survey | None = None,
) -> PruneReport:
    """:func:`prune` in one transaction, then the replaced contents this device does not
    hold and has not said so of yet announced to every device (``backer prune``, the
    node); by a share restored from an older copy, only once it has its own newer events
    back (it appends nothing until then: a later prune announces them)."""
    with share.db.conn:
        report = prune(share.root, share.catalog, now_ms, dry_run, policy, surveyed)
    if not dry_run and not share.own_events_missing:
        fresh = report.unheld - share.catalog.unheld_here(share.device)
        report.announced = share.announce_unheld(fresh)
    return report


def held_by_kept(root: Path, catalog: Catalog, now_ms: int) -> int:
    """Bytes of disk that ``backer prune --all`` would free now: what the kept contents of
    replaced and deleted versions take beyond the share's own files (it reads and
    decodes every recorded version: seconds at a million files)."""
    return prune(root, catalog, now_ms, dry_run=True, policy=DROP_ALL).bytes


def held_by_kept_apart(root: Path, now_ms: int, stop: threading.Event | None = None) -> int:
    """:func:`held_by_kept` through :func:`read_apart`."""
    with read_apart(root, stop) as catalog:
        return held_by_kept(root, catalog, now_ms)


class KeptBytes:
    """:func:`held_by_kept` of one share for a running node: read in a worker thread
    (in the loop it stalled every session for seconds on a large share, each time a
    full disk's wording changed) and kept until the node's connection changes the
    catalog (``total_changes``: the node is the share's only writer)."""

    def __init__(self) -> None:
        self._known: tuple[int, int] | None = None  # (total_changes when read, bytes)
        self._reading = asyncio.Lock()  # one read at a time; a second caller reuses it

    async def measure(self, share: Share) -> int:
        """What ``backer prune --all`` would free in ``share`` now."""
        async with self._reading:
            conn = share.db.conn
            changes = conn.total_changes
            if self._known is not None and self._known[0] == changes:
                return self._known[1]
            settled = not conn.in_transaction  # (else its commit changes no count)
            stop = threading.Event()
            loop = asyncio.get_running_loop()
            now = entropy.now_ms()
            try:
                held = await loop.run_in_executor(None, held_by_kept_apart, share.root, now, stop)
            except asyncio.CancelledError:
                stop.set()
                raise
            if settled:
                self._known = (changes, held)
            return held
