"""Find what changed on disk since the last scan, hashing only what must be hashed.

A walk stats every entry (never following symlinks) and compares (size, mtime_ns,
inode, mode) with the ``local`` cache; only new or changed regular files are read,
chunked and hashed, in worker threads. A file that changes while it is being read is
re-read; one that keeps changing, or cannot be read, is reported and left as it was
recorded — an unreadable file is never mistaken for a deleted one.

A whole scan streams: the walk yields entries directory by directory and the files to
read are hashed and handed to the caller a batch at a time (:func:`batch_files`: 5,000
files, growing to 50,000 in a large share), so a first scan of a million files holds
one batch, not the share, in memory.
"""

from __future__ import annotations

import bisect
import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from backer.db.catalog import LocalEntry, Problem
from backer.fs.mounts import ShareDisk, is_mount_root, keeps_permissions, share_disk
from backer.fs.paths import METADATA_DIR, BadPath, check_name, fold, is_valid
from backer.model import entropy
from backer.model.records import PERMISSION_BITS, Kind
from backer.scanner.content import Manifest, manifest_of_file
from backer.scanner.ignore import IGNORE_FILE, IgnoreRules, is_temp_name

if TYPE_CHECKING:
    from backer.progress import ProgressCallback

READ_ATTEMPTS = 3
THREADED_FROM = 1024 * 1024  # smaller files hash faster inline than through a thread pool
FRESH_NS = 2_000_000_000  # an mtime this recent may still change within its granularity
BATCH_FILES = 5000  # files a streamed scan reads before the caller records them, at least
BATCH_SHARE = 8  # and at least this fraction (1/8) of the files walked so far,
MAX_BATCH_FILES = 50_000  # up to this many (see batch_files)


class Seen(NamedTuple):
    """One entry found on disk (a tuple: a scan makes one per file)."""

    path: str  # share-relative, spelled as on disk
    disk_path: str
    kind: Kind
    size: int
    mtime_ns: int
    inode: int
    mode: int

    @property
    def stat_key(self) -> tuple[int, int, int, int]:
        return self.size, self.mtime_ns, self.inode, self.mode

    @property
    def permissions(self) -> int:
        """Permission bits worth syncing: files' and directories' (links have none)."""
        return 0 if self.kind == Kind.SYMLINK else self.mode & PERMISSION_BITS


@dataclass
class Observation:
    """What a scan found: a new state for changed paths, and what is gone."""

    changed: list[tuple[Seen, Manifest | None, bytes]] = field(default_factory=list)
    refreshed: list[LocalEntry] = field(default_factory=list)  # same content, new stat
    reindexed: list[tuple[str, Manifest]] = field(default_factory=list)  # re-hashed files
    deleted: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)  # recorded, now ignored: not deleted
    errors: list[Problem] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)  # temp files of interrupted writes
    unchanged: int = 0
    hashed_bytes: int = 0
    # what the walk compared with (:func:`classify` then sorts ``candidates`` out)
    candidates: list[tuple[Seen, Manifest | None, bytes]] = field(default_factory=list)
    local: dict[str, LocalEntry] = field(default_factory=dict)  # the scan cache it used
    scope: list[str] | None = None  # the subtrees scanned; None: the whole share
    observed_ns: int = 0  # when the walk ended: what "fresh" mtimes are judged against
    final: bool = True  # False: one batch of a streamed scan (the rest comes later)
    # parents of the paths found changed so far, shared by a streamed scan's batches
    changed_parents: set[str] = field(default_factory=set)
    permissions_kept: bool = True  # False: the disk shows no real permission bits
    # ... and then the bits recorded for each candidate (see :func:`classify`)
    permissions: dict[str, int] = field(default_factory=dict)


# The permission bits recorded for a new entry where the disk keeps none (Syncthing's
# choice for such folders too): never the mount's 0o777 on every peer.
DEFAULT_PERMISSIONS = {Kind.FILE: 0o644, Kind.DIRECTORY: 0o755, Kind.SYMLINK: 0}


def permissions_of(found: Observation, seen: Seen) -> int:
    """The permission bits to record for ``seen``: its own, unless the disk keeps none."""
    return found.permissions.get(seen.path, seen.permissions)


class ScanStopped(Exception):
    """A scan in a worker thread was asked to stop (its caller was cancelled)."""


# The scan cache rows of ``paths`` (None: all) and of everything below ``subtrees``.
LocalReader = Callable[[list[str] | None, list[str]], dict[str, LocalEntry]]
# The scan-cache paths recorded with one of some inodes.
NamesReader = Callable[[list[int]], list[str]]


def walk(
    root: Path,
    disk: ShareDisk,
    rules: IgnoreRules,
    errors: list[Problem],
    leftovers: list[str],
    unreadable: set[str],
    top: str = "",
    stop: threading.Event | None = None,
) -> Iterator[Seen]:
    """Every non-ignored entry under ``root`` (or only its directory ``top`` and what is
    below it), in path order (the scan cache's order: a whole scan reads both side by
    side); the paths that could not be read go to ``unreadable``. ``disk``: the
    share's filesystem and mount points, which the walk never crosses.

    A directory is listed when the walk reaches the place of its entries: after its
    siblings whose names sort before ``name + '/'`` (``a.b`` comes before ``a/x``).
    backer's own temp files (from a write that was interrupted) go to ``leftovers``.
    """
    start = os.path.join(root, top) if top else os.fspath(root)
    listed = (disk, rules, errors, leftovers, unreadable)
    stack = [iter(_listing(start, top + "/" if top else "", *listed))]
    while stack:
        if stop is not None and stop.is_set():
            raise ScanStopped
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
        elif isinstance(item[1], Seen):
            yield item[1]
        else:  # the entries of a directory, at the place of "name/"
            directory, prefix = item[1]
            stack.append(iter(_listing(directory, prefix, *listed)))


def _listing(
    directory: str,
    prefix: str,
    disk: ShareDisk,
    rules: IgnoreRules,
    errors: list[Problem],
    leftovers: list[str],
    unreadable: set[str],
) -> list[tuple[str, Seen | tuple[str, str]]]:
    """The entries of one directory as (sort key, entry), with (``name/``, (its disk
    path, its prefix)) for each subdirectory to list, sorted: the order of their paths."""
    try:
        entries = list(os.scandir(directory))
    except OSError as exc:
        here = prefix.rstrip("/")
        errors.append(Problem(here or ".", f"cannot list directory: {exc.strerror}"))
        unreadable.add(here)
        return []
    entries.sort(key=lambda e: e.name)
    items: list[tuple[str, Seen | tuple[str, str]]] = []
    folded: dict[str, str] = {}
    for entry in entries:
        folded_name = fold(entry.name)
        if folded_name == METADATA_DIR:  # is_reserved(), without folding twice
            if prefix or entry.name != METADATA_DIR:
                errors.append(_reserved(prefix + entry.name, entry.path))
            continue
        try:
            path = prefix + check_name(entry.name)
        except BadPath as exc:
            errors.append(Problem(repr(prefix + entry.name), f"skipped: {exc}"))
            continue
        twin = folded.setdefault(folded_name, path)
        if twin != path:  # both are synced; only some filesystems can hold both
            errors.append(
                Problem(
                    path,
                    f"same name as {twin} once case and Unicode "
                    "normalisation are ignored: a device whose filesystem ignores them can "
                    "keep only one",
                    warning=True,
                )
            )
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError as exc:
            errors.append(Problem(path, f"cannot stat: {exc.strerror}"))
            unreadable.add(path)
            continue
        found = _entry(path, entry.path, info, rules, errors, leftovers)
        if found is not None and _mounted(found, info, disk, errors, unreadable):
            continue
        if found is not None:
            name = path[len(prefix) :]
            items.append((name, found))
            if found.kind == Kind.DIRECTORY:
                items.append((name + "/", (entry.path, path + "/")))
    items.sort(key=lambda item: item[0])
    return items


def _entry(
    path: str,
    disk_path: str,
    info: os.stat_result,
    rules: IgnoreRules,
    errors: list[Problem],
    leftovers: list[str],
) -> Seen | None:
    """The entry to record for what ``lstat`` found at ``path``; None for what is not
    recorded (an ignored path, a special file, one of backer's temp files)."""
    if stat.S_ISDIR(info.st_mode):
        kind = Kind.DIRECTORY
    elif stat.S_ISREG(info.st_mode):
        kind = Kind.FILE
    elif stat.S_ISLNK(info.st_mode):
        kind = Kind.SYMLINK
    else:
        errors.append(Problem(path, "skipped: not a regular file, directory or symlink"))
        return None
    if kind != Kind.DIRECTORY and is_temp_name(path.rpartition("/")[2]):  # links are staged too
        leftovers.append(disk_path)
        return None
    if rules.ignored(path, kind == Kind.DIRECTORY):
        return None
    size = 0 if kind == Kind.DIRECTORY else info.st_size
    return Seen(path, disk_path, kind, size, info.st_mtime_ns, info.st_ino, info.st_mode)


def _mounted(
    found: Seen, info: os.stat_result, disk: ShareDisk, errors: list[Problem], unreadable: set[str]
) -> bool:
    """True (reported, and kept as recorded, like an unreadable folder) for a folder on
    another filesystem than the share's: a disk or a bind mounted inside the share is
    not followed. Unmounted, it would be an empty folder, and every device would delete
    what was recorded below it; as a share of its own, backer sees it go. A bind of a
    folder of the same filesystem has the share's device: the mount table names it.
    A file bound onto (R69) is not the share's either: the table names it here, the
    kernel once it is to be read (:func:`read_stable`): a bind changes what the file's
    lstat shows, so it is read again, and an unchanged file costs no statx."""
    if found.kind == Kind.DIRECTORY:
        if not disk.crosses(found.path, info, found.disk_path):
            return False
    elif found.path not in disk.mount_points:
        return False
    errors.append(Problem(found.path, MOUNTED if found.kind == Kind.DIRECTORY else BOUND, True))
    unreadable.add(found.path)
    return True


MOUNTED = (
    "skipped: another filesystem is mounted here, and backer does not follow mount "
    "points (make it a share of its own to sync it)"
)
BOUND = "skipped: a file is mounted here (a bind), and backer does not follow mount points"


def _reserved(path: str, disk_path: str) -> Problem:
    """Why a directory entry named like the metadata directory is skipped (another
    share's metadata is expected, so only a warning)."""
    if os.path.isfile(os.path.join(disk_path, "backer.db")):
        return Problem(path, "skipped: the metadata of another share inside this one", True)
    return Problem(path, f"skipped: reserved name (backer's metadata directory is {METADATA_DIR})")


def _stat_key(path: str) -> tuple[int, int, int, int]:
    return stat_key_of(os.lstat(path))


def _changed_from(
    path: str, before: tuple[int, int, int, int]
) -> tuple[int, int, int, int] | None:
    """What ``lstat`` finds at ``path`` now, if it is no longer ``before``."""
    try:
        after = _stat_key(path)
    except OSError:
        return None
    return None if after == before else after


def read_stable(seen: Seen) -> tuple[Seen, Manifest | None, bytes, Problem | None]:
    """Hash a file, or read a link, making sure it did not change while being read.

    Returns the (possibly re-statted) entry, its manifest for files, the content bytes
    of the version (manifest id or link target) and the problem, if any: a file that
    is a mount point (a bind, R69) is not read.
    """
    current = seen
    for _ in range(READ_ATTEMPTS):
        if current.kind == Kind.FILE and is_mount_root(current.disk_path):
            return current, None, b"", Problem(seen.path, BOUND, warning=True)
        before = (current.size, current.mtime_ns, current.inode, current.mode)
        try:
            if current.kind == Kind.SYMLINK:
                manifest, content = None, os.fsencode(os.readlink(current.disk_path))
            else:
                manifest = manifest_of_file(current.disk_path, current.size)
                content = manifest.id
            after = _stat_key(current.disk_path)
        except OSError as exc:
            changed = _changed_from(current.disk_path, before)
            if changed is None:
                return current, None, b"", Problem(seen.path, f"cannot read: {exc.strerror}")
            after = changed  # (swapped for a link or a fifo since the walk: looked at again)
        if after == before:
            return current, manifest, content, None
        size, mtime_ns, inode, mode = after
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            break
        kind = Kind.FILE if stat.S_ISREG(mode) else Kind.SYMLINK
        current = Seen(seen.path, seen.disk_path, kind, size, mtime_ns, inode, mode)
    return current, None, b"", Problem(seen.path, "kept changing while being read; will retry")


def cache_entry(
    path: str, version_id: str, stat_key: tuple[int, int, int, int], now_ns: int
) -> LocalEntry:
    """The ``local`` row for what is on disk at ``path`` (as ``stat_key``) now.

    It is settled (trusted at the next scan without re-hashing) unless its mtime is
    within FRESH_NS of this observation, on either side: only then could a write in the
    same timestamp tick leave the stat unchanged. An mtime far in this device's future
    (a file from a peer whose clock is ahead) is as safe as one far in its past: any
    local write moves it to now."""
    size, mtime_ns, inode, mode = stat_key
    settled = abs(now_ns - mtime_ns) > FRESH_NS
    return LocalEntry(path, version_id, size, mtime_ns, inode, mode, settled)


def stat_key_of(info: os.stat_result) -> tuple[int, int, int, int]:
    """(size, mtime_ns, inode, mode) as the scanner records them (directories: no size)."""
    size = 0 if stat.S_ISDIR(info.st_mode) else info.st_size
    return size, info.st_mtime_ns, info.st_ino, info.st_mode


def entry_key(key: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """A stat key without a directory's mtime, which moves with every entry put in or
    taken out: what says that an entry itself changed (its entries speak for
    themselves)."""
    size, mtime_ns, inode, mode = key
    return size, 0 if stat.S_ISDIR(mode) else mtime_ns, inode, mode


def batch_files(walked: int) -> int:
    """How many files a streamed scan reads before the caller records them, once it has
    walked ``walked`` entries. Each recorded batch is a commit, and a commit writes a
    page per row of the indexes keyed by content or chunk hash once they outgrow it: a
    first scan of 1,000,000 files in batches of 5,000 rewrote each such page ~200 times.
    Batches that grow with the share (to a bound on what one holds in memory) keep that
    from growing with the square of the files (docs/decisions.md)."""
    return max(BATCH_FILES, min(MAX_BATCH_FILES, walked // BATCH_SHARE))


def look(
    root: Path,
    local_for: LocalReader,
    paths: Iterable[str] | None = None,
    progress: ProgressCallback | None = None,
    workers: int | None = None,
    stop: threading.Event | None = None,
    record: Callable[[Observation], None] | None = None,
    local_after: LocalPager | None = None,
    names_of: NamesReader | None = None,
) -> Observation:
    """Walk the share (or only ``paths``, with the subtrees of directories among them),
    compare with the scan cache and hash what changed; no verdict yet on whether a
    hashed file holds new content (that is :func:`classify`, which needs the catalog).

    Needs nothing but the disk and ``local_for``, so it can run in a worker thread.
    A whole scan reads the cache through ``local_after`` (default: ``local_for`` of
    everything, sorted) a page at a time beside the walk, both in path order, so that it
    never holds the share's cache; each observation's ``local`` holds the cache rows of
    its own candidates, deletions and forgotten paths only.
    A path named in ``paths`` and gone from the disk is deleted, with all below it.
    ``names_of``: a partial scan that finds a changed file with more than one link scans
    the other recorded names of its inode too (an edit through one name changes all).
    ``stop`` set: :class:`ScanStopped` is raised at the next directory or file.
    ``record``: handed each batch of files read (:func:`batch_files`) as an observation
    of their own (not ``final``) while the walk goes on; what is returned is the rest,
    with the directories, the deletions and every problem of the whole scan.
    """
    result = Observation(permissions_kept=keeps_permissions(root / METADATA_DIR))
    rules = IgnoreRules.load(root)
    if rules.unread is not None:
        result.errors.append(Problem(IGNORE_FILE, f"{IGNORE_FILE} {rules.unread}", True))
    for line in rules.invalid:
        result.errors.append(Problem(IGNORE_FILE, f"pattern skipped, not valid: {line!r}", True))
    disk = share_disk(root)
    scope = None if paths is None else _scope(root, rules, paths, local_for)
    result.scope = scope
    unreadable: set[str] = set()
    entries: Iterable[Seen]
    cache: _CacheInOrder | None = None
    if scope is None:
        cache = _CacheInOrder(local_after or pages_of(local_for(None, [])))
        find = cache.find
        entries = walk(root, disk, rules, result.errors, result.leftovers, unreadable, stop=stop)
    else:  # what is recorded below a path recorded as a file or link is nothing
        recorded = local_for(scope, [])
        below = [t for t in scope if t not in recorded or stat.S_ISDIR(recorded[t].mode)]
        local = result.local  # a partial scan's cache rows are few: all kept
        local.update(recorded)
        local.update(local_for([], below))
        find = local.get
        seen: dict[str, Seen] = {}
        for top in scope:
            _walk_top(root, disk, top, rules, result, seen, unreadable, stop)
        linked = _other_names(scope, seen, local, names_of) if names_of is not None else []
        if linked:
            local.update(local_for(linked, []))
            for name in linked:
                _walk_top(root, disk, name, rules, result, seen, unreadable, stop)
            scope = result.scope = sorted(outermost([*scope, *linked]))
        _stat_parents(root, disk, scope, rules, result, seen, unreadable, local_for)
        entries = seen.values()
    batch: dict[str, LocalEntry] = {}  # the cache rows of the files to read
    to_read: list[Seen] = []
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
        reader = _Reader(pool, progress, stop, unreadable, result.errors)
        for walked, entry in enumerate(entries):
            cached = find(entry.path)
            if cached is not None and cached.settled and cached.stat_key == entry.stat_key:
                result.unchanged += 1
                continue
            if entry.kind == Kind.DIRECTORY:
                result.candidates.append((entry, None, b""))
                if cached is not None:
                    result.local[entry.path] = cached
                continue
            if cached is not None:
                batch[entry.path] = cached
            reader.found(entry)
            to_read.append(entry)
            if record is not None and len(to_read) >= batch_files(walked):
                part = Observation(
                    local=batch,
                    scope=scope,
                    observed_ns=entropy.now_ns(),
                    final=False,
                    changed_parents=result.changed_parents,
                    permissions_kept=result.permissions_kept,
                )
                reader.read(to_read, part)
                to_read, batch = [], {}
                record(part)
        result.observed_ns = entropy.now_ns()
        result.local.update(batch)
        reader.read(to_read, result)
    if cache is not None:
        missing = cache.rest()
    else:
        present = {seen.path for seen in entries}
        missing = [local[path] for path in sorted(local.keys() - present)]
    for gone in missing:
        if under_any(gone.path, unreadable):
            continue
        result.local[gone.path] = gone
        if rules.excluded(gone.path, stat.S_ISDIR(gone.mode)):
            result.forgotten.append(gone.path)  # a rule stops syncing; it never deletes
        else:
            result.deleted.append(gone.path)
    return result


# The scan cache rows after a path, in path order, at most so many.
LocalPager = Callable[[str, int], list[LocalEntry]]
CACHE_PAGE = 5000  # scan cache rows a whole scan reads at a time


def pages_of(local: dict[str, LocalEntry]) -> LocalPager:
    """A :data:`LocalPager` over a scan cache already in memory."""
    rows = sorted(local.values())
    paths = [row.path for row in rows]

    def after(path: str, limit: int) -> list[LocalEntry]:
        start = bisect.bisect_right(paths, path)
        return rows[start : start + limit]

    return after


class _CacheInOrder:
    """The scan cache in path order, read a page at a time beside a walk in the same
    order (a merge join): :meth:`find` is each walked path's row, the rows walked past
    are the cached paths gone from the disk (:meth:`rest`, at the end).

    A page is read only when the walk has passed the last one, and never again once the
    cache is read to its end: so the rows a streamed scan records for what it walked
    (all behind the walk) are never read back as if the walk had missed them."""

    def __init__(self, read_after: LocalPager) -> None:
        self.read_after = read_after
        self.rows: deque[LocalEntry] = deque()
        self.last = ""  # the last path read ("" sorts before every path)
        self.done = False
        self.missing: list[LocalEntry] = []

    def _more(self) -> bool:
        if self.done:
            return False
        page = self.read_after(self.last, CACHE_PAGE)
        self.done = len(page) < CACHE_PAGE
        if page:
            self.last = page[-1].path
            self.rows.extend(page)
        return bool(page)

    def find(self, path: str) -> LocalEntry | None:
        rows = self.rows
        while True:
            while rows and rows[0].path < path:
                self.missing.append(rows.popleft())
            if rows:
                return rows.popleft() if rows[0].path == path else None
            if not self._more():
                return None

    def rest(self) -> list[LocalEntry]:
        """The rows the walk did not find on disk."""
        while self.rows or self._more():
            self.missing.extend(self.rows)
            self.rows.clear()
        return self.missing


class _Reader:
    """Hashes the files a walk found to read, batch by batch, with progress counted
    over the whole walk (its totals grow as the walk finds more)."""

    def __init__(
        self,
        pool: ThreadPoolExecutor,
        progress: ProgressCallback | None,
        stop: threading.Event | None,
        unreadable: set[str],
        errors: list[Problem],
    ) -> None:
        self.pool, self.progress, self.stop = pool, progress, stop
        self.unreadable, self.errors = unreadable, errors
        self.files = self.files_done = self.bytes = self.bytes_done = 0

    def found(self, entry: Seen) -> None:
        self.files += 1
        self.bytes += entry.size

    def _read(self, seen: Seen) -> tuple[Seen, Manifest | None, bytes, Problem | None]:
        if self.stop is not None and self.stop.is_set():
            raise ScanStopped
        return read_stable(seen)

    def read(self, entries: list[Seen], into: Observation) -> None:
        """Hash ``entries`` (small files inline, large ones in the pool) into ``into``'s
        candidates; a file that cannot be read is a problem of the whole scan."""
        small = [e for e in entries if e.size < THREADED_FROM]
        large = [e for e in entries if e.size >= THREADED_FROM]
        for entry, manifest, content, error in chain(
            map(self._read, small), self.pool.map(self._read, large)
        ):
            self.bytes_done += entry.size
            self.files_done += 1
            if self.progress is not None:
                self.progress(self.files_done, self.files, self.bytes_done, self.bytes)
            if error is not None:
                self.errors.append(error)
                self.unreadable.add(entry.path)
                continue
            into.hashed_bytes += entry.size if manifest is not None else 0
            into.candidates.append((entry, manifest, content))


def _scope(
    root: Path, rules: IgnoreRules, paths: Iterable[str], local_for: LocalReader
) -> list[str] | None:
    """The subtrees to scan for ``paths``: each path, widened to its top-most ancestor
    that is not a recorded directory on disk (a new directory, or one replaced by a
    file or a link: what is below it must be seen from there), without those inside
    another. None (the whole share) when the ignore rules themselves changed."""
    wanted = set()
    for path in paths:
        if path == IGNORE_FILE or path == "":
            return None
        if is_valid(path):
            wanted.add(path)
    parents = {p.rsplit("/", 1)[0] for p in wanted if "/" in p}
    ancestors = {"/".join(p.split("/")[:i]) for p in parents for i in range(1, p.count("/") + 2)}
    recorded = local_for(sorted(ancestors), [])
    directories = {  # the ancestors that are recorded directories, and still are on disk
        a for a, e in recorded.items() if stat.S_ISDIR(e.mode) and _is_directory(root, a)
    }
    tops = set()
    for path in wanted:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            ancestor = "/".join(parts[:depth])
            if ancestor not in directories:
                path = ancestor
                break
        tops.add(path)
    return sorted(outermost(tops))


def _other_names(
    scope: list[str], seen: dict[str, Seen], local: dict[str, LocalEntry], names_of: NamesReader
) -> list[str]:
    """The recorded names, outside ``scope``, of the inodes of the changed files in
    ``seen`` that have more than one link (nearly all: the store holds one): the watcher
    names only the path written, and the other names hold the same new bytes."""
    inodes = set()
    for entry in seen.values():
        cached = local.get(entry.path)
        if entry.kind != Kind.FILE or (cached is not None and cached.stat_key == entry.stat_key):
            continue
        try:
            info = os.lstat(entry.disk_path)
        except OSError:
            continue
        if info.st_nlink > 1 and info.st_ino == entry.inode:
            inodes.add(entry.inode)
    if not inodes:
        return []
    tops = set(scope)
    return sorted({name for name in names_of(sorted(inodes)) if not under_any(name, tops)})


def _is_directory(root: Path, path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(os.path.join(root, path)).st_mode)
    except OSError:
        return False


def _walk_top(
    root: Path,
    disk: ShareDisk,
    top: str,
    rules: IgnoreRules,
    result: Observation,
    seen: dict[str, Seen],
    unreadable: set[str],
    stop: threading.Event | None,
) -> None:
    """Add ``top`` (a path whose parents are recorded directories) and, for a directory,
    everything below it, to ``seen``; a ``top`` that is gone leaves nothing, one on
    another filesystem (a watcher's event below a mount point) stays as recorded."""
    disk_path = os.path.join(root, top)
    try:
        info = os.lstat(disk_path)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        result.errors.append(Problem(top, f"cannot stat: {exc.strerror}"))
        unreadable.add(top)
        return
    if rules.excluded(top, stat.S_ISDIR(info.st_mode)):
        return
    found = _entry(top, disk_path, info, rules, result.errors, result.leftovers)
    if found is None or _mounted(found, info, disk, result.errors, unreadable):
        return
    elsewhere = found.kind != Kind.DIRECTORY and (
        _device_of(os.path.dirname(disk_path)) != disk.device
    )
    if elsewhere or disk.below_mount(top) or _mounted_above(root, top):
        unreadable.add(top)
        return
    seen[top] = found
    if found.kind == Kind.DIRECTORY:
        below = walk(root, disk, rules, result.errors, result.leftovers, unreadable, top, stop)
        seen.update((entry.path, entry) for entry in below)


def _mounted_above(root: Path, top: str) -> bool:
    """Whether a folder above ``top`` (below the share's root) is a mount's root now,
    as the kernel says: a bind made since the scan read the mount table (R66), which
    :meth:`ShareDisk.below_mount` cannot know of. A whole walk asks each folder it
    reaches; a partial scan reaches ``top`` without passing through them."""
    parent = top.rpartition("/")[0]
    while parent:
        if is_mount_root(os.path.join(root, parent)):
            return True
        parent = parent.rpartition("/")[0]
    return False


def _device_of(directory: str) -> int | None:
    try:
        return os.stat(directory).st_dev
    except OSError:
        return None


def _stat_parents(
    root: Path,
    disk: ShareDisk,
    scope: list[str],
    rules: IgnoreRules,
    result: Observation,
    seen: dict[str, Seen],
    unreadable: set[str],
    local_for: LocalReader,
) -> None:
    """The directories holding the ``scope`` of a partial scan (recorded ones: see
    :func:`_scope`), stat'ed without walking them: an entry added or removed changes
    their mtime, which :func:`classify` records with it."""
    parents = sorted({top.rpartition("/")[0] for top in scope} - {""} - seen.keys())
    result.local.update(local_for(parents, []))
    for parent in parents:
        disk_path = os.path.join(root, parent)
        try:
            info = os.lstat(disk_path)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode) and parent in result.local:
            found = _entry(parent, disk_path, info, rules, result.errors, result.leftovers)
            if found is not None and not _mounted(found, info, disk, result.errors, unreadable):
                seen[parent] = found


def classify(
    found: Observation, recorded_content: Callable[[LocalEntry], tuple[Kind, bytes, int] | None]
) -> Observation:
    """Sort the walk's candidates into changed and refreshed entries (in place).
    On a disk that keeps no permission bits, the bits recorded stand (a new entry gets
    DEFAULT_PERMISSIONS): the mount's mode is no person's change.

    ``recorded_content`` maps a cache entry to the (kind, content, permissions) of the
    version it recorded, so a file whose stat changed but whose bytes did not (a
    touch, a copy-back) produces no new version. A directory is a file whose content is
    its entries: its new mtime is recorded when an entry of it changed in this scan,
    never for a touch alone nor for backer's own writes (they are recorded already).
    """
    touched: list[Seen] = []  # directories as recorded but for their mtime
    for entry, manifest, content in found.candidates:
        cached = found.local.get(entry.path)
        recorded = recorded_content(cached) if cached is not None else None
        if not found.permissions_kept:  # the recorded bits stand; a new entry's: default
            same_kind = recorded is not None and recorded[0] == entry.kind
            bits = recorded[2] if same_kind else DEFAULT_PERMISSIONS[entry.kind]
            found.permissions[entry.path] = bits
        if recorded == (entry.kind, content, permissions_of(found, entry)):
            assert cached is not None
            if entry.kind == Kind.DIRECTORY and cached.mtime_ns != entry.mtime_ns:
                touched.append(entry)
                continue
            refreshed = cache_entry(
                entry.path, cached.version_id, entry.stat_key, found.observed_ns
            )
            found.refreshed.append(refreshed)
            if manifest is not None:  # read anyway: let peers fetch its chunks here
                found.reindexed.append((entry.path, manifest))
        else:
            found.changed.append((entry, manifest, content))
    found.candidates = []
    found.changed_parents.update(
        path.rpartition("/")[0]
        for path in chain((s.path for s, _, _ in found.changed), found.deleted)
    )
    _record_directory_times(found, touched)
    return found


def _record_directory_times(found: Observation, touched: list[Seen]) -> None:
    """A directory whose mtime moved is recorded again (its new mtime reaches peers)
    when one of its entries was added, changed or deleted in this scan (in any batch
    of it); otherwise (a touch, a temp file of backer's come and gone) only its cache
    entry is refreshed."""
    parents = found.changed_parents
    for entry in touched:
        if entry.path in parents:
            found.changed.append((entry, None, b""))
        else:
            version_id = found.local[entry.path].version_id
            refreshed = cache_entry(entry.path, version_id, entry.stat_key, found.observed_ns)
            found.refreshed.append(refreshed)


def observe(
    root: Path,
    local: dict[str, LocalEntry],
    recorded_content: Callable[[LocalEntry], tuple[Kind, bytes, int] | None],
    progress: ProgressCallback | None = None,
    workers: int | None = None,
) -> Observation:
    """Compare the whole disk with the ``local`` cache and return what changed."""
    found = look(root, lambda paths, subtrees: local, None, progress, workers)
    return classify(found, recorded_content)


def outermost(paths: Iterable[str]) -> set[str]:
    """``paths`` without those below another of them (each stands for its subtree)."""
    kept: set[str] = set()
    for path in sorted(paths, key=lambda p: p.count("/")):
        if not under_any(path, kept):
            kept.add(path)
    return kept


def under_any(path: str, prefixes: set[str]) -> bool:
    """True when ``path`` is, or is below, one of ``prefixes`` ('' is the root)."""
    if "" in prefixes or path in prefixes:
        return True
    parts = path.split("/")
    return any("/".join(parts[:i]) in prefixes for i in range(1, len(parts)))
