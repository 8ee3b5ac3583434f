"""What backer may do to a device's files, checked around every step backer takes.

- **Only verified bytes are recorded**: every local version a device has recorded, whose
  file is still exactly as recorded (same size, mtime, inode, mode), holds the bytes of
  that version (its manifest id, or its link target). A short write or an unverified
  file that became visible breaks this at once.
- **Ignore rules never turn into deletions**: no scan records the deletion of a path its
  rules ignore (checked by :meth:`Node.scan`), and an entry that the device's rules
  ignored before a step and still ignore is never removed or changed by backer.
- **No user file goes without a trace**: a file or link that backer removes or replaces
  was recorded at that path, is no longer live there, and its bytes are kept in the
  content store ``.backer/store/`` (a link's target in its recorded version).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import weakref
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from backer.model import entropy
from backer.model.records import Kind, Version
from backer.model.share import Share
from backer.scanner.content import manifest_of_bytes
from backer.scanner.ignore import IgnoreRules, is_temp_name
from backer.scanner.walk import stat_key_of
from backer.versioner.store import STORE_DIR

METADATA = ".backer"
Entry = tuple[str, bytes]  # ("file", bytes) or ("link", target)


class InvariantBroken(AssertionError):
    """A property of the whole cluster does not hold."""


class Clock(entropy.SeededSource):
    """The seeded source, whose clock a rule moves on (minutes to weeks pass between
    edits and prunes)."""

    def advance(self, ms: int) -> None:
        self._now += ms * 1_000_000

    def node(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Time read within is node ``name``'s own clock (one clock for all here; see
        :class:`simulations.clocks.SkewedClock`)."""
        return contextlib.nullcontext()


def on_node(name: str) -> contextlib.AbstractContextManager[None]:
    """Within, backer and the person act for node ``name``: its clock tells the time."""
    source = entropy._source
    return source.node(name) if isinstance(source, Clock) else contextlib.nullcontext()


@contextlib.contextmanager
def clock_installed(clock: Clock) -> Iterator[Clock]:
    """Everything backer records takes its randomness and time from ``clock``."""
    previous, entropy._source = entropy._source, clock
    try:
        yield clock
    finally:
        entropy._source = previous


def scratch_dir() -> str | None:
    """Where nodes live: ``BACKER_SIM_DIR``, else memory (``/dev/shm``) where there is
    one: a simulated crash loses no page cache, so flushing to a real disk only costs
    time (3/4 of a campaign's wall time on a busy disk)."""
    chosen = os.environ.get("BACKER_SIM_DIR")
    if chosen is None and os.access("/dev/shm", os.W_OK):
        chosen = "/dev/shm"
    return chosen


@dataclass
class Folder:
    """One folder of a :func:`walk`: its path, a descriptor of it (open while it is
    visited) and its entries (links to folders among the folders, never entered)."""

    path: str
    relative: str  # its path below the walk's root ('' for the root)
    fd: int
    folders: list[os.DirEntry[str]]
    others: list[os.DirEntry[str]]

    def below(self, entry: os.DirEntry[str]) -> str:
        """``entry``'s path relative to the walk's root."""
        return f"{self.relative}/{entry.name}" if self.relative else entry.name

    def read(self, entry: os.DirEntry[str]) -> bytes:
        fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.fd)
        with open(fd, "rb") as handle:
            return handle.read()

    def target(self, entry: os.DirEntry[str]) -> str:
        return os.readlink(entry.name, dir_fd=self.fd)


DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def walk(root: os.PathLike[str] | str) -> Iterator[Folder]:
    """Every folder under ``root`` (itself first), top down in ``os.walk``'s order,
    without recursion and each opened from its parent's descriptor: ``os.walk`` and
    ``shutil.rmtree`` recurse (Python 3.11), and a tree deeper than the recursion
    limit is valid (the ``deep`` family); a path of 1,000 levels costs the kernel 1,000
    lookups each time it is named. A caller may prune ``folders`` as with os.walk."""
    try:
        pending = [(os.fspath(root), "", os.open(root, DIRECTORY))]
    except OSError:
        return
    while pending:
        top, relative, fd = pending.pop()
        try:
            with os.scandir(fd) as found:
                listed = list(found)
            folder = Folder(top, relative, fd, [], [])
            for entry in listed:
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                (folder.folders if is_dir else folder.others).append(entry)
            yield folder
            for entry in reversed(folder.folders):
                if not entry.is_symlink():
                    with contextlib.suppress(OSError):
                        child = os.open(entry.name, DIRECTORY, dir_fd=fd)
                        pending.append((os.path.join(top, entry.name), folder.below(entry), child))
        finally:
            os.close(fd)


def remove_tree(root: os.PathLike[str] | str) -> None:
    """``shutil.rmtree(root)`` without recursion (see :func:`walk`): everything inside
    is removed as it is listed, then the folders, deepest first. An OSError is raised
    (what was removed before it stays removed, as with rmtree)."""
    folders = []
    for folder in walk(root):
        folders.append(folder.path)
        for entry in folder.others + [e for e in folder.folders if e.is_symlink()]:
            os.unlink(entry.name, dir_fd=folder.fd)
    for path in reversed(folders):
        os.rmdir(path)


def is_backer_temp(name: str) -> bool:
    """backer's own temp names (they carry a check, see ``backer.scanner.ignore.temp_name``); a
    person's files named ``*.backer-tmp`` are theirs."""
    return is_temp_name(name)


def reachable_temps(root: Path) -> list[Path]:
    """backer's temp files under ``root`` that its scans can find and sweep. A temp
    inside a directory the rules ignore is out of reach: backer never enters such a
    directory, not even to remove a temp that a crash, or a failing disk, left there
    as the rule came (a transfer into it was under way); the scan after the rule goes
    sweeps it. backer writes nothing there once the rule is on disk."""
    rules = IgnoreRules.load(root)
    found = []
    for folder in walk(root):
        if folder.relative and ignored(rules, folder.relative, True):
            continue
        found += [Path(folder.path, e.name) for e in folder.folders + folder.others
                  if is_backer_temp(e.name)]  # fmt: skip
    return found


def entries(root: Path) -> dict[str, Entry]:
    """Files and links under ``root`` by their on-disk relative name (outside .backer,
    backer's temps left out)."""
    found: dict[str, Entry] = {}
    for folder in walk(root):
        if not folder.relative:
            folder.folders[:] = [e for e in folder.folders if e.name != METADATA]
        for entry in folder.others + [e for e in folder.folders if e.is_symlink()]:
            if is_backer_temp(entry.name):
                continue
            if entry.is_symlink():
                found[folder.below(entry)] = ("link", os.fsencode(folder.target(entry)))
            else:
                found[folder.below(entry)] = ("file", folder.read(entry))
    return found


def pin_directory_times(roots: list[Path], since_ns: int, names: list[str]) -> int:
    """Give every directory whose mtime the kernel set since ``since_ns`` (real time) a
    time from the seeded clock instead (of the node ``names`` says: the kernel stamps
    with its device's clock), so that the directory times backer records are a function
    of the seed too (the seeded clock runs months behind the real one; the kernel's file
    clock may lag the real one by a tick: a second of margin). Returns how many
    directories the roots hold."""
    since_ns -= 10**9
    count = 0
    for root, name in zip(roots, names, strict=True):
        with on_node(name):
            for folder in walk(root):
                if not folder.relative:
                    folder.folders[:] = [e for e in folder.folders if e.name != METADATA]
                count += len(folder.folders)
                for entry in folder.folders:
                    if not entry.is_symlink() and entry.stat().st_mtime_ns >= since_ns:
                        stamp = entropy.now_ns()
                        os.utime(entry.name, ns=(stamp, stamp), dir_fd=folder.fd)
    return count


OPENS_PER_FOLDER = 8  # folder opens a step of backer's may make per folder on any disk
OPENS_ANYWAY = 2_000  # and beyond that (small trees: a few windows, each from the root)


def check_folder_opens(opens: int, folders: int) -> None:
    """The folders backer opened in one step are bounded by the folders on the disks
    (before and after it): each window, scan and check opens a folder from the nearest
    one it holds, not from the share's root. Walking from the root costs O(depth) opens
    per folder, O(depth²) for a deep tree: a 1,000-level tree blocked the receiver's
    loop for minutes (R34)."""
    if opens > OPENS_PER_FOLDER * folders + OPENS_ANYWAY:
        raise InvariantBroken(
            f"backer opened folders {opens} times in one step, with {folders} folders on "
            "the disks before and after it (a walk from the share's root per folder?)"
        )


def ignored(rules: IgnoreRules, path: str, is_dir: bool = False) -> bool:
    """Whether the scanner leaves ``path`` alone: it, or a directory above it, is ignored."""
    folder = path.rpartition("/")[0]
    return (folder != "" and _folder_ignored(rules, folder)) or rules.ignored(path, is_dir)


_FOLDERS: weakref.WeakKeyDictionary[IgnoreRules, dict[str, bool]] = weakref.WeakKeyDictionary()


def _folder_ignored(rules: IgnoreRules, folder: str) -> bool:
    """Whether ``folder`` or one above it is ignored, remembered per rules object: a
    tree of 1,000 levels asks about each level for each path below it (O(depth) per
    new folder, not per path)."""
    memo = _FOLDERS.setdefault(rules, {})
    pending, above = [], folder
    while above and above not in memo:
        pending.append(above)
        above = above.rpartition("/")[0]
    found = memo.get(above, False)
    for name in reversed(pending):
        found = memo[name] = found or rules.ignored(name, True)
    return memo[folder]


def check_no_spares(name: str, root: Path) -> None:
    """A running node's content store holds no spare (an entry being made, a whole
    file's copy without hard links): a keep ends within its step, and what a kill left
    is removed once the share is open again. Before, a kill mid-copy left it for good."""
    left = sorted(p.name for p in (root / METADATA / STORE_DIR).rglob("*.tmp"))
    if left:
        raise InvariantBroken(f"{name}'s content store holds spares a kill left: {left[:3]}")


def kept_versions(root: Path) -> set[Entry]:
    """What the content store keeps, and every link target recorded (a link is kept by
    its version; an empty file needs no bytes)."""
    kept = set(entries(root / METADATA / STORE_DIR).values()) | {("file", b"")}
    with contextlib.closing(sqlite3.connect(root / METADATA / "backer.db")) as conn:
        for (record,) in conn.execute("SELECT record FROM versions"):
            version = Version.decode(record)
            if version.kind == Kind.SYMLINK:
                kept.add(("link", version.content))
    return kept


@dataclass
class Watch:
    """Each node's files before a step of backer's, and the recorded files verified."""

    strict: bool = False  # also: what backer removes was replaced by a recorded event
    before: list[dict[str, Entry]] = field(default_factory=list)
    verified: dict[tuple[str, str], tuple] = field(default_factory=dict)

    rules: list[IgnoreRules] = field(default_factory=list)

    folders: int = 0  # how many the roots held before the step
    placeholders: set[tuple[int, int]] = field(default_factory=set)  # backer made (Disks)
    left: list[set[str]] = field(default_factory=list)  # placeholders a kill left, per root
    put: dict[tuple[str, str], tuple[bytes, set[str]]] = field(default_factory=dict)
    # (node, path) -> the bytes its person last wrote there, and the versions live there then

    def person_wrote(self, name: str, share: Share | None, path: str, data: bytes) -> None:
        """Node ``name``'s person wrote ``data`` at ``path``: remember what was live there
        then (with the strict check, backer may remove that file only on a newer event)."""
        if share is not None:
            self.put[(name, path)] = (data, set(share.catalog.live_for([path]).get(path, {})))

    def start(self, roots: list[Path]) -> None:
        self.before = [entries(root) for root in roots]
        self.left = [
            {path for path, entry in before.items() if self._placeholder(root / path, entry)}
            for root, before in zip(roots, self.before, strict=True)
        ]
        self.folders = sum(1 for root in roots for folder in walk(root) for _ in folder.folders)
        self.rules = [IgnoreRules.load(root) for root in roots]

    def _placeholder(self, path: Path, entry: Entry) -> bool:
        """Whether ``path`` is an empty placeholder of backer's (which the next scan
        removes: see backer.fs.placeholders)."""
        if entry != ("file", b"") or not self.placeholders:
            return False
        found = path.lstat()
        return (found.st_dev, found.st_ino) in self.placeholders

    def check(self, names: list[str], roots: list[Path], shares: list[Share | None]) -> None:
        for name, root, share, before, rules, left in zip(
            names, roots, shares, self.before, self.rules, self.left, strict=True
        ):
            before = {path: entry for path, entry in before.items() if path not in left}
            check_untouched(name, root, share if self.strict else None, before, rules)
            if self.strict and share is not None:
                self.check_put_back(name, root, share, before)
            if share is not None:
                self.check_recorded_bytes(name, root, share)
                check_no_spares(name, root)

    def check_put_back(
        self, name: str, root: Path, share: Share, before: dict[str, Entry]
    ) -> None:
        """A file its person wrote that backer removed was removed by a version newer
        than the person's write: not by one live there already, which the file its
        person wrote since supersedes (a deleted file put back from a backup, its old
        bytes those of the version the deletion replaced, was taken for that version and
        deleted again)."""
        for (node, path), (data, live_then) in self.put.items():
            if not live_then or node != name or before.get(path) != ("file", data):
                continue
            if os.path.lexists(root / path):
                continue
            live_now = set(share.catalog.live_for([path]).get(path, {}))
            if live_now <= live_then:
                raise InvariantBroken(
                    f"{name} removed {path!r}, which its person wrote after the versions "
                    "live there (no newer event asked for it)"
                )

    def check_recorded_bytes(self, name: str, root: Path, share: Share) -> None:
        """A recorded local version whose file is as recorded holds that version's bytes."""
        for entry in share.catalog.local_entries().values():
            if stat.S_ISDIR(entry.mode):
                continue  # (no bytes; a deep tree has a thousand)
            try:
                info = os.lstat(root / entry.path)
            except OSError:  # gone, or a name this filesystem cannot hold
                continue
            if stat_key_of(info) != entry.stat_key:
                continue  # changed since: the next scan records it
            key = (name, entry.path)
            if self.verified.get(key) == (entry.version_id, entry.stat_key):
                continue
            version = share.catalog.version(entry.version_id)
            if version is None or version.kind == Kind.DIRECTORY:
                continue
            path = root / entry.path
            if version.kind == Kind.FILE:
                found = manifest_of_bytes(path.read_bytes()).id if path.is_file() else b""
            else:
                found = os.fsencode(os.readlink(path)) if path.is_symlink() else b""
            if found != version.content:
                raise InvariantBroken(
                    f"{name} recorded {entry.path!r} as {entry.version_id} ({version.size} "
                    "bytes) but its bytes on disk are not that version's"
                )
            self.verified[key] = (entry.version_id, entry.stat_key)


def check_untouched(
    name: str, root: Path, share: Share | None, before: dict[str, Entry], rules: IgnoreRules
) -> None:
    """After a step of backer's: nothing its rules ignored all along was removed or
    changed; any other file or link backer removed or replaced is kept and (given the
    ``share``) was recorded there and replaced by a recorded event. (A rule that arrives
    in a step does not bind the plan made before it.)"""
    after = entries(root)
    now = IgnoreRules.load(root)
    kept: set[Entry] | None = None
    for path, entry in before.items():
        if after.get(path) == entry:
            continue
        removed = path not in after
        what = "removed" if removed else "changed"
        if ignored(now, path) and ignored(rules, path):
            raise InvariantBroken(f"{name} {what} {path!r}, which its ignore rules leave alone")
        kept = kept_versions(root) if kept is None else kept
        if entry not in kept:
            raise InvariantBroken(f"{name} {what} {path!r} without keeping its old bytes")
        if share is not None and not _recorded_and_replaced(share, path, entry):
            raise InvariantBroken(
                f"{name} {what} {path!r}, whose bytes were not a replaced version"
            )


def _recorded_and_replaced(share: Share, path: str, entry: Entry) -> bool:
    """Whether ``entry``'s bytes were recorded at ``path`` as a version that a recorded
    event replaced there (a later version or deletion, or a lost conflict)."""
    kind, data = entry
    content = manifest_of_bytes(data).id if kind == "file" else data
    wanted = Kind.FILE if kind == "file" else Kind.SYMLINK
    recorded = {
        vid: Version.decode(record)
        for vid, record in share.catalog.conn.execute(
            "SELECT vid, record FROM versions WHERE path = ?", (path,)
        )
    }
    superseded = {old for v in recorded.values() for old in v.supersedes}
    live = share.catalog.live_for([path]).get(path, {})
    return any(
        v.kind == wanted and v.content == content and (vid in superseded or vid not in live)
        for vid, v in recorded.items()
    )


# A disk without permission bits (the ``nomodes`` family) shows every entry with this
# mode: no person's umask or exec toggle makes it, so met on a disk that keeps bits it
# can only have come from that disk, recorded as a change.
MOUNT_MODE = 0o705
MODELESS_ROOTS: set[str] = set()  # the roots of such disks in this run


def _mode(root: Path, relative: str, info: os.stat_result) -> int:
    """The permission bits of an entry, for comparison across nodes; an entry of a disk
    that keeps bits must not have the mode a disk without them shows."""
    mode = info.st_mode & 0o777
    if mode == MOUNT_MODE and MODELESS_ROOTS and os.fspath(root) not in MODELESS_ROOTS:
        raise InvariantBroken(
            f"{relative} on {root} has {MOUNT_MODE:o}, the mode of a disk without "
            "permission bits: a scan there took it for a person's change"
        )
    return mode


def synced_trees(roots: list[Path], blocked: Collection[str] = ()) -> list[dict[str, tuple]]:
    """What a person sees under each root and backer syncs, comparable across nodes:
    ignored entries are left out, and so is every path at or above an ignored entry on
    any node (a directory holding an ignored file, or an ignored directory, cannot give
    way to a file). A path one node's rules leave out is pinned even where that node
    lacks it: backer writes no path its rules ignore (seed 11772: a garbled
    ``.backerignore`` that matched everything, itself included)."""
    pinned: set[str] = set(blocked)
    trees = [synced_tree(root, pinned) for root in roots]
    keeping = [t for r, t in zip(roots, trees, strict=True) if os.fspath(r) not in MODELESS_ROOTS]
    for root, tree in zip(roots, trees, strict=True):
        if os.fspath(root) in MODELESS_ROOTS and keeping:  # its modes are not compared:
            for path, value in tree.items():  # it shows whatever the others hold
                other = keeping[0].get(path)
                if other is not None and other[:-1] == value[:-1] and value[0] != "link":
                    tree[path] = other
    rules = [IgnoreRules.load(root) for root in roots]
    for tree in trees:
        for path, value in tree.items():
            if any(ignored(r, path, value[0] == "dir") for r in rules):
                pinned.add(path)
    return [{p: v for p, v in tree.items() if not is_pinned(p, pinned)} for tree in trees]


def is_pinned(path: str, pinned: set[str]) -> bool:
    """Whether ``path`` is an ignored entry in ``pinned``, inside one, or a directory
    above one. The other entries of such a directory are compared as any others: an
    ignored file beside them must not hide one that never arrived."""
    return any(path == q or path.startswith(q + "/") or q.startswith(path + "/") for q in pinned)


def synced_tree(root: Path, pinned: set[str]) -> dict[str, tuple]:
    """Kinds, bytes, link targets and modes by name as spelled on disk, ignored entries
    left out (they go into ``pinned``, see :func:`is_pinned`). backer's own
    temps pin nothing: a kept temp (chunks not yet anywhere) would hide the missing file
    beside it, and convergence would stop a round before it arrives."""
    rules = IgnoreRules.load(root)
    result: dict[str, tuple] = {}
    for folder in walk(root):
        if not folder.relative:
            folder.folders[:] = [e for e in folder.folders if e.name != METADATA]
        for entry in folder.folders + folder.others:
            if is_backer_temp(entry.name):  # never a person's: it must be gone, and pins nothing
                continue
            relative = folder.below(entry)
            info = entry.stat(follow_symlinks=False)
            if ignored(rules, relative, stat.S_ISDIR(info.st_mode)):
                pinned.add(relative)
                continue
            if stat.S_ISLNK(info.st_mode):
                value: tuple = ("link", folder.target(entry))
            elif stat.S_ISDIR(info.st_mode):
                value = ("dir", _mode(root, relative, info))
            else:
                value = ("file", folder.read(entry), _mode(root, relative, info))
            result[relative] = value
    return result
