"""Find what changed on disk since the last scan, hashing only what must be hashed.

A walk stats every entry (never following symlinks) and compares (size, mtime_ns,
inode, mode) with the ``local`` cache; only new or changed regular files are read,
chunked and hashed, in worker threads. A file that changes while it is being read is
re-read; one that keeps changing, or cannot be read, is reported and left as it was
recorded — an unreadable file is never mistaken for a deleted one.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import NamedTuple

from backer.db.catalog import LocalEntry, Problem
from backer.fs.paths import METADATA_DIR, BadPath, check_name, fold, is_reserved
from backer.model import entropy
from backer.model.records import PERMISSION_BITS, Kind
from backer.progress import ProgressCallback
from backer.scanner.content import Manifest, manifest_of_file
from backer.scanner.ignore import IgnoreRules, is_temp_name

READ_ATTEMPTS = 3
THREADED_FROM = 1024 * 1024  # smaller files hash faster inline than through a thread pool
FRESH_NS = 2_000_000_000  # an mtime this recent may still change within its granularity


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


def walk(
    root: Path, rules: IgnoreRules, errors: list[Problem], leftovers: list[str]
) -> tuple[dict[str, Seen], set[str]]:
    """Every non-ignored entry under ``root``; also the directories that could not be read.

    backer's own temp files (from a write that was interrupted) go to ``leftovers``.
    """
    seen: dict[str, Seen] = {}
    unreadable: set[str] = set()
    stack: list[tuple[str, str]] = [(os.fspath(root), "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            here = prefix.rstrip("/")
            errors.append(Problem(here or ".", f"cannot list directory: {exc.strerror}"))
            unreadable.add(here)
            continue
        folded: dict[str, str] = {}
        for entry in entries:
            if is_reserved(entry.name):
                if prefix or entry.name != METADATA_DIR:
                    errors.append(_reserved(prefix + entry.name, entry.path))
                continue
            try:
                path = prefix + check_name(entry.name)
            except BadPath as exc:
                errors.append(Problem(repr(prefix + entry.name), f"skipped: {exc}"))
                continue
            twin = folded.setdefault(fold(entry.name), path)
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
            if stat.S_ISDIR(info.st_mode):
                kind = Kind.DIRECTORY
            elif stat.S_ISREG(info.st_mode):
                kind = Kind.FILE
            elif stat.S_ISLNK(info.st_mode):
                kind = Kind.SYMLINK
            else:
                errors.append(Problem(path, "skipped: not a regular file, directory or symlink"))
                continue
            if kind != Kind.DIRECTORY and is_temp_name(entry.name):  # links are staged too
                leftovers.append(entry.path)
                continue
            if rules.ignored(path, kind == Kind.DIRECTORY):
                continue
            mtime = 0 if kind == Kind.DIRECTORY else info.st_mtime_ns
            size = 0 if kind == Kind.DIRECTORY else info.st_size
            seen[path] = Seen(path, entry.path, kind, size, mtime, info.st_ino, info.st_mode)
            if kind == Kind.DIRECTORY:
                stack.append((entry.path, path + "/"))
    return seen, unreadable


def _reserved(path: str, disk_path: str) -> Problem:
    """Why a directory entry named like the metadata directory is skipped (another
    share's metadata is expected, so only a warning)."""
    if os.path.isfile(os.path.join(disk_path, "backer.db")):
        return Problem(path, "skipped: the metadata of another share inside this one", True)
    return Problem(path, f"skipped: reserved name (backer's metadata directory is {METADATA_DIR})")


def _stat_key(path: str) -> tuple[int, int, int, int]:
    return stat_key_of(os.lstat(path))


def read_stable(seen: Seen) -> tuple[Seen, Manifest | None, bytes, Problem | None]:
    """Hash a file, or read a link, making sure it did not change while being read.

    Returns the (possibly re-statted) entry, its manifest for files, the content bytes
    of the version (manifest id or link target) and the problem, if any.
    """
    current = seen
    for _ in range(READ_ATTEMPTS):
        try:
            before = (current.size, current.mtime_ns, current.inode, current.mode)
            if current.kind == Kind.SYMLINK:
                manifest, content = None, os.fsencode(os.readlink(current.disk_path))
            else:
                manifest = manifest_of_file(current.disk_path, current.size)
                content = manifest.id
            after = _stat_key(current.disk_path)
        except OSError as exc:
            return current, None, b"", Problem(seen.path, f"cannot read: {exc.strerror}")
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
    """(size, mtime_ns, inode, mode) as the scanner records them (directories: no size, mtime)."""
    if stat.S_ISDIR(info.st_mode):
        return 0, 0, info.st_ino, info.st_mode
    return info.st_size, info.st_mtime_ns, info.st_ino, info.st_mode


def observe(
    root: Path,
    local: dict[str, LocalEntry],
    recorded_content: Callable[[LocalEntry], tuple[Kind, bytes, int] | None],
    progress: ProgressCallback | None = None,
    workers: int | None = None,
) -> Observation:
    """Compare the disk with the ``local`` cache and return what changed.

    ``recorded_content`` maps a cache entry to the (kind, content, permissions) of the
    version it recorded, so a file whose stat changed but whose bytes did not (a
    touch, a copy-back) produces no new version.
    """
    result = Observation()
    rules = IgnoreRules.load(root)
    seen, unreadable = walk(root, rules, result.errors, result.leftovers)
    now_ns = entropy.now_ns()
    to_read: list[Seen] = []
    for path, entry in seen.items():
        cached = local.get(path)
        if cached is not None and cached.settled and cached.stat_key == entry.stat_key:
            result.unchanged += 1
        elif entry.kind == Kind.DIRECTORY:
            recorded = recorded_content(cached) if cached is not None else None
            if cached is not None and recorded == (Kind.DIRECTORY, b"", entry.permissions):
                refreshed = cache_entry(entry.path, cached.version_id, entry.stat_key, now_ns)
                result.refreshed.append(refreshed)
            else:
                result.changed.append((entry, None, b""))
        else:
            to_read.append(entry)
    files_done, done, total = 0, 0, sum(e.size for e in to_read)
    small = [e for e in to_read if e.size < THREADED_FROM]
    large = [e for e in to_read if e.size >= THREADED_FROM]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
        for entry, manifest, content, error in chain(
            map(read_stable, small), pool.map(read_stable, large)
        ):
            done += entry.size
            files_done += 1
            if progress is not None:
                progress(files_done, len(to_read), done, total)
            if error is not None:
                result.errors.append(error)
                unreadable.add(entry.path)
                continue
            result.hashed_bytes += entry.size if manifest is not None else 0
            cached = local.get(entry.path)
            recorded = recorded_content(cached) if cached is not None else None
            if recorded == (entry.kind, content, entry.permissions):
                assert cached is not None
                result.refreshed.append(
                    cache_entry(entry.path, cached.version_id, entry.stat_key, now_ns)
                )
                if manifest is not None:  # read anyway: let peers fetch its chunks here
                    result.reindexed.append((entry.path, manifest))
            else:
                result.changed.append((entry, manifest, content))
    for path in sorted(local.keys() - seen.keys()):
        if _under_any(path, unreadable):
            continue
        if rules.excluded(path, stat.S_ISDIR(local[path].mode)):
            result.forgotten.append(path)  # a rule stops syncing; it never deletes
        else:
            result.deleted.append(path)
    return result


def _under_any(path: str, prefixes: set[str]) -> bool:
    """True when ``path`` is, or is below, one of ``prefixes`` ('' is the root)."""
    if "" in prefixes or path in prefixes:
        return True
    parts = path.split("/")
    return any("/".join(parts[:i]) in prefixes for i in range(1, len(parts)))
