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
    for path in root.rglob("*"):
        parent = path.parent.relative_to(root).as_posix()
        if is_backer_temp(path.name) and (parent == "." or not ignored(rules, parent, True)):
            found.append(path)
    return found


def entries(root: Path) -> dict[str, Entry]:
    """Files and links under ``root`` by their on-disk relative name (outside .backer,
    backer's temps left out)."""
    found: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == os.fspath(root):
            dirnames[:] = [d for d in dirnames if d != METADATA]
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            if is_backer_temp(name):
                continue
            full = os.path.join(dirpath, name)
            relative = os.path.relpath(full, root).replace(os.sep, "/")
            if os.path.islink(full):
                found[relative] = ("link", os.fsencode(os.readlink(full)))
            else:
                with open(full, "rb") as handle:
                    found[relative] = ("file", handle.read())
    return found


def pin_directory_times(roots: list[Path], since_ns: int) -> None:
    """Give every directory whose mtime the kernel set since ``since_ns`` (real time) a
    time from the seeded clock instead, so that the directory times backer records are
    a function of the seed too (the seeded clock runs months behind the real one; the
    kernel's file clock may lag the real one by a tick: a second of margin)."""
    since_ns -= 10**9
    for root in roots:
        for dirpath, dirnames, _ in os.walk(root):
            if dirpath == os.fspath(root):
                dirnames[:] = [d for d in dirnames if d != METADATA]
            for name in dirnames:
                path = os.path.join(dirpath, name)
                if not os.path.islink(path) and os.lstat(path).st_mtime_ns >= since_ns:
                    stamp = entropy.now_ns()
                    os.utime(path, ns=(stamp, stamp), follow_symlinks=False)


def ignored(rules: IgnoreRules, path: str, is_dir: bool = False) -> bool:
    """Whether the scanner leaves ``path`` alone: it, or a directory above it, is ignored."""
    parts = path.split("/")
    for depth in range(1, len(parts)):
        if rules.ignored("/".join(parts[:depth]), True):
            return True
    return rules.ignored(path, is_dir)


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

    def start(self, roots: list[Path]) -> None:
        self.before = [entries(root) for root in roots]
        self.rules = [IgnoreRules.load(root) for root in roots]

    def check(self, names: list[str], roots: list[Path], shares: list[Share | None]) -> None:
        for name, root, share, before, rules in zip(
            names, roots, shares, self.before, self.rules, strict=True
        ):
            check_untouched(name, root, share if self.strict else None, before, rules)
            if share is not None:
                self.check_recorded_bytes(name, root, share)

    def check_recorded_bytes(self, name: str, root: Path, share: Share) -> None:
        """A recorded local version whose file is as recorded holds that version's bytes."""
        for entry in share.catalog.local_entries().values():
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


def synced_trees(roots: list[Path], blocked: Collection[str] = ()) -> list[dict[str, tuple]]:
    """What a person sees under each root and backer syncs, comparable across nodes:
    ignored entries are left out, and so is every path at or above an ignored entry on
    any node (a directory holding an ignored file, or an ignored directory, cannot give
    way to a file). A path one node's rules leave out is pinned even where that node
    lacks it: backer writes no path its rules ignore (seed 11772: a garbled
    ``.backerignore`` that matched everything, itself included)."""
    pinned: set[str] = set(blocked)
    trees = [synced_tree(root, pinned) for root in roots]
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
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == os.fspath(root):
            dirnames[:] = [d for d in dirnames if d != METADATA]
        for name in dirnames + filenames:
            if is_backer_temp(name):  # never a person's: it must be gone, and pins nothing
                continue
            path = Path(dirpath) / name
            relative = path.relative_to(root).as_posix()
            info = path.lstat()
            if ignored(rules, relative, stat.S_ISDIR(info.st_mode)):
                pinned.add(relative)
                continue
            if path.is_symlink():
                value: tuple = ("link", os.readlink(path))
            elif path.is_dir():
                value = ("dir", info.st_mode & 0o777)
            else:
                value = ("file", path.read_bytes(), info.st_mode & 0o777)
            result[relative] = value
    return result
