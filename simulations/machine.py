"""The hypothesis state machine: random edits, syncs, cuts and crashes on a cluster.

The *world* is the set of real-world families switched on (see :data:`FAMILIES`); with
none, a scenario is exactly what it was before they existed (old seeds replay).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import time
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from backer.fs import dirs
from backer.model import entropy, materializer, revisions
from backer.model.records import Kind, Version
from backer.scanner import walk
from backer.scanner.content import manifest_of_bytes
from backer.scanner.ignore import IGNORE_FILE
from backer.versioner import config as retention_config
from backer.versioner.retention import DAY, HOUR, MINUTE, WEEK

from .clocks import OFFSETS, Learned, SkewedClock, check_all_pruned, check_own_times_ascend
from .cluster import Cluster
from .hostile import BIG_RULES, CRAFTS
from .invariants import (
    check_bytes_scale_with_difference,
    check_honest_paths,
    check_kept_readable,
    check_order_independence,
    check_pushed,
    check_quiescent,
    check_recorded_once,
    check_resolved,
    check_retention_window,
    check_said_what_is_missing,
    check_still_recoverable,
    converge,
    fingerprint,
    recoverable,
)
from .watching import reported
from .world import (
    MODELESS_ROOTS,
    MOUNT_MODE,
    Clock,
    InvariantBroken,
    clock_installed,
    on_node,
    pin_directory_times,
    remove_tree,
    scratch_dir,
)

NODES = int(os.environ.get("BACKER_SIM_NODES", "3"))
DIRS = ["a", "b", "a/c"]
FILES = ["f", "g", "a/f", "a/c/h", "b/g", "a/c"]
CONTENTS = [b"", b"same", b"other", b"x" * 70_000]
UNSEEN = ["truncate", "append", "mmap", "kept"]  # how a file changes with no event heard at once

node_index = st.integers(min_value=0, max_value=NODES - 1)
dir_path = st.sampled_from(DIRS)
content = st.one_of(st.sampled_from(CONTENTS), st.binary(max_size=300))

FAMILIES = {
    "faults": "a node's disk I/O fails (seeded ENOSPC, EIO, EDQUOT, short writes, failing "
    "fsync/syncfs/rename/mkdir/link/reads), switched on and off per node",
    "disk": "a node's disk fills up (a byte budget; also mid-window, in the writer, copier "
    "and checker threads, their fsyncs and the catalog) and is freed later",
    "durability": "small batching thresholds and 20 KB files: symlinks and large files "
    "share batches, so both durability paths run",
    "fills": "a node's disk fills while it applies a window (generates disk_fills)",
    "ignore": ".backerignore patterns added and removed, matching existing files",
    "unicode": "NFD and NFC spellings of names (macOS writes NFD)",
    "long": "names of 200, 240 and 255 bytes (NAME_MAX counts bytes, temp names too)",
    "case": "names that differ only by case",
    "tmpnames": "a person's own files named *.backer-tmp",
    "strict": "(a check) a file backer removes or replaces was replaced by a recorded "
    "event, not only kept",
    "retention": "time passes (minutes to weeks) and nodes prune kept contents as "
    "`backer prune` does, some with a small size cap set as `backer config` does",
    "revisions": "people restore versions of files (deleted ones too) and folders as they "
    "were at a past moment, and resolve conflicts (keep one, keep both, keep the newest)",
    "hostile": "one node per seed is a member running a modified client: it records "
    "crafted events (paths out of the share or impossible here, links with files through "
    "them, a .backerignore link/folder/2 MiB, lying sizes, kind changes, one id at two "
    "paths, extreme times, floods, another member's name), stops answering chunk requests "
    "or serves bytes that do not hash; every node lives in a sandbox that must hold "
    "nothing else",
    "deep": "chains of nested folders 1,100 to 1,200 levels deep (past Python's recursion "
    "limit) with a file at the bottom, made, extended, renamed at any level and deleted; "
    "the watcher walks them as it does; backer may open each folder a bounded number of "
    "times per step",
    "clocks": "each device's wall clock is off by its own amount (minutes to days, either "
    "way), stepped while it runs or at a reboot (NTP correcting it); `prune --all` frees "
    "every replaced content",
    "kills": "a node's process is killed inside one of backer's operations (a scan, a "
    "sync's ingest and windows, a delivery, a prune, a restore): before its Nth durable "
    "step (a database commit, rename, unlink, rmdir, fsync, syncfs, link), then restarts "
    "as after SIGKILL; no change is recorded twice and every kept content stays readable",
    "saves": "a person saves a new file at the very path a window is about to rename a "
    "received file to, between the window's look and its rename (it must stay: a conflict)",
    "plainrename": "one node's filesystem lacks renameat2's flags (EINVAL, as NFS): a "
    "received file goes to an empty path by a hard link, a recorded one is replaced by a "
    "rename (with saves: the person's file must stay there too)",
    "nolinks": "one node's filesystem has no hard links (EPERM, as exFAT or FAT): the "
    "content store keeps copies, and every replaced content stays readable",
    "nomodes": "one node's filesystem keeps no permission bits (exFAT, FAT): every entry "
    "shows the mount's mode and chmod changes nothing; that mode never reaches a disk "
    "that keeps bits, where the bits a person set stay",
    "resident": "nodes run as `backer run`: links stay open, the watcher scans after edits "
    "while transfers go on (hashing, then recording) and pushes to every open link, edits "
    "land while a plan is applied, nodes stop and start again",
    "unseen": "(with resident) a person changes a file with no event the watcher hears at "
    "once: cut by truncate(2) or appended to and kept open (the written-file watch reports "
    "it once its writes pause: at a later scan), or written through mmap (no event at all: "
    "only a peer's request that finds its recorded bytes gone, or a whole scan, sees it)",
}
ALL = frozenset(FAMILIES)
CLASSIC: frozenset[str] = frozenset()
DEFAULT_WORLD = frozenset(  # what CI and the tests run: the families that hold today
    {"faults", "disk", "fills", "durability", "ignore", "unicode", "case", "long", "tmpnames"}
    | {"strict", "resident", "retention", "revisions", "clocks", "saves", "kills"}
    | {"nolinks", "plainrename", "unseen", "nomodes"}
)  # (not deep: a seed with a 1,100-level chain costs backer a minute; see docs/simulations.md)
NAMES = {
    "unicode": ["caf\u00e9", "a/re\u0301sume\u0301"],  # NFC; NFD, as macOS writes it
    "long": ["k" * 200, "a/" + "m" * 240, "n" * 255],  # 240: its temp name is too long
    "case": ["F", "a/F"],  # case variants of f and a/f
}
TMPNAMES = ["notes.backer-tmp", "a/notes.backer-tmp"]
LOGS = ["x.log", "a/x.log"]
PATTERNS = ["*.log", "g", "a/c", "b/", "/f", "h", "F", "m*", "*.backer-tmp"]
LARGE = b"y" * 20_000  # above the simulation's durability threshold
SMALL_THRESHOLDS = {  # so a few small files exercise batching and both durability paths
    "SYNCFS_BELOW_AVERAGE": 4096,
    "STAGE_FILES": 3,
    "STAGE_BYTES": 64 * 1024,
}
FAULT_RATES = [0.02, 0.1, 0.3]
SAVE_RATE = 0.2  # share of the renames onto an empty path that a person races (saves)
WAITS = [  # how long a prune waits (ms): around each tier's edges, minutes to weeks
    MINUTE, 20 * MINUTE, 59 * MINUTE, 61 * MINUTE, 3 * HOUR, DAY, 3 * DAY, WEEK, 5 * WEEK,
    20 * WEEK, 52 * WEEK,
]  # fmt: skip
RESOLUTIONS = ["keep", "keep-both", "keep-newest"]
CAPS = ["0%", "10%"]  # max-disk: 0% always binds; 10% binds on a full disk (a budget)
SEEDED_START_NS = 1_767_225_600 * 10**9  # entropy's seeded clock starts at 2026-01-01
EARLY_MS = 3 * 52 * WEEK  # retention: the clock starts this much earlier, and moves
# on at most this much, so every time stays behind the real clock
DISK_BUDGETS = [0, 5_000, 60_000]
DEEP_TOP, DEEP_ASIDE = "d", "e"  # a chain's folders (one letter: 1,200 levels fit PATH_MAX)
DEEP_LEVELS = 1_100  # past the recursion limit (1,000) with room for the caller's frames
DEEP_MOST = 1_200  # no deeper: the path stays well under MAX_PATH_BYTES (4,096)
DEEP_GROWTH = 7  # levels a chain already there grows by
DEEP_OPS = ["grow", "rename", "delete", "write"]
DEEP_FILE = "z"
KILLED_IN = ["scan", "sync", "deliver", "prune", "restore"]  # the operations a kill ends


def world_files(world: frozenset[str]) -> list[str]:
    """The file names a scenario in ``world`` edits (the classic ones first)."""
    names = [name for family, some in NAMES.items() if family in world for name in some]
    return (
        FILES
        + (LOGS if "ignore" in world else [])
        + names
        + (TMPNAMES if "tmpnames" in world else [])
    )


def _inside(root: Path, path: Path) -> str | None:
    """Where ``path`` really is (links followed), relative to ``root``, if inside it."""
    real = Path(os.path.realpath(path))
    base = Path(os.path.realpath(root))
    return real.relative_to(base).as_posix() if real.is_relative_to(base) else None


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:depth]) for depth in range(1, len(parts))]


def deep_chain(root: Path) -> list[str]:
    """The folders of the chain under ``root`` (``d``, then each level's ``d`` or, once
    renamed, ``e``), top first; opened one level at a time (a path of 1,000 levels costs
    the kernel 1,000 lookups each time it is named)."""
    chain: list[str] = []
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while True:
            for name in (DEEP_TOP, DEEP_ASIDE) if chain else (DEEP_TOP,):
                try:
                    child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError:
                    continue
                os.close(fd)
                fd = child
                chain.append(f"{chain[-1]}/{name}" if chain else name)
                break
            else:
                return chain
    finally:
        os.close(fd)


def make_levels(root: Path, below: str, count: int) -> str:
    """``count`` folders, each in the last, under ``below`` ('' for ``root``): made one
    level at a time from the last one's descriptor (``Path.mkdir(parents=True)``
    recurses). Returns the deepest."""
    fd = os.open(root / below if below else root, os.O_RDONLY | os.O_DIRECTORY)
    path = below
    try:
        for _ in range(count):
            os.mkdir(DEEP_TOP, dir_fd=fd)
            child = os.open(DEEP_TOP, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
            path = f"{path}/{DEEP_TOP}" if path else DEEP_TOP
    finally:
        os.close(fd)
    return path


def world_contents(world: frozenset[str]) -> list[bytes]:
    return CONTENTS + ([LARGE] if "durability" in world else [])


any_file = st.sampled_from(world_files(ALL))


class ClusterMachine(RuleBasedStateMachine):
    """Every rule acts on real files or real sessions; teardown checks the invariants."""

    world: frozenset[str] = DEFAULT_WORLD

    def __init__(
        self, nodes: int = NODES, seed: int = 0, world: Iterable[str] | None = None
    ) -> None:
        super().__init__()
        if world is not None:
            self.world = frozenset(world)
        self.files = set(world_files(self.world))
        self.seeded = contextlib.ExitStack()
        early = ("retention" in self.world) * EARLY_MS * 10**6
        start = SEEDED_START_NS - early  # the run is a function of the seed
        skewed = "clocks" in self.world
        self.clock = SkewedClock(seed, start, nodes) if skewed else Clock(seed, start)
        self.waited = 0
        self.seeded.enter_context(clock_installed(self.clock))
        if "durability" in self.world:
            for name, value in SMALL_THRESHOLDS.items():
                self.seeded.callback(setattr, materializer, name, getattr(materializer, name))
                setattr(materializer, name, value)
            # a window's folders outnumber the descriptors it keeps, as in a real share
            # of thousands of folders: descriptors are evicted while writer threads lend
            # them (a KeyError of a folder's name, found by a benchmark's join)
            self.seeded.callback(setattr, dirs, "OPEN_DIRECTORIES", dirs.OPEN_DIRECTORIES)
            dirs.OPEN_DIRECTORIES = 2
        if "hostile" in self.world:  # its 2 MiB rule file is hashed in this thread, so the
            # world moves between a scan's hashing and its recording here, as a seed replays
            self.seeded.callback(setattr, walk, "THREADED_FROM", walk.THREADED_FROM)
            walk.THREADED_FROM = 2 * len(BIG_RULES)
        self.base = Path(tempfile.mkdtemp(prefix="backer-sim-", dir=scratch_dir()))
        self.cluster = Cluster(
            self.base,
            seed=seed,
            size=nodes,
            resident="resident" in self.world,
            boxed="hostile" in self.world,
        )
        self.cluster.watch.strict = "strict" in self.world
        if isinstance(self.clock, SkewedClock):
            self.cluster.learned = Learned(self.clock)
            self.cluster.note_learned()
        self.seeded.enter_context(self.cluster.disks.installed())
        if "saves" in self.world:
            for index, node in enumerate(self.cluster.nodes):
                saves = seed * 1009 + index  # (not drawn from the cluster's: traces stay)
                self.cluster.disks.save_first(node.root, saves, SAVE_RATE, node.edit_one)
        if "plainrename" in self.world:
            self.cluster.disks.plain_renames(self.cluster.nodes[seed % nodes].root)
        self.no_links_node = seed % nodes if "nolinks" in self.world else None
        if self.no_links_node is not None:
            self.cluster.disks.no_hard_links(self.cluster.nodes[self.no_links_node].root)
        MODELESS_ROOTS.clear()
        if "nomodes" in self.world:
            modeless = self.cluster.nodes[(seed + 1) % nodes].root
            self.cluster.disks.no_permission_bits(modeless, MOUNT_MODE)
            MODELESS_ROOTS.add(os.fspath(modeless))
        self.stats = dict.fromkeys(
            (
                "syncs",
                "cuts",
                "crashes",
                "kills",
                "restores",
                "stops",
                "races",
                "edits",
                "conflicts",
                "bytes",
                "prunes",
                "pruned_versions",
                "pruned_bytes",
                "revised",
                "refused",
            ),
            0,
        )
        self.fingerprint = b""
        self.resolved: dict[tuple[str, str], set[str]] = {}  # copy -> what its resolution recorded

    def _fs(
        self,
        node: int,
        action,
        *touched: Path,
        changed: Iterable[str] | None = (),
        heard: str = "now",
    ) -> None:
        """Run a file-system edit of node ``node``'s person; the files it touched get a
        modification time from the seeded clock (so a seed replays byte for byte), and so
        do the directories. Its watcher sees the ``touched`` and ``changed`` paths (None:
        anything) change, and every directory the edit made above them: ``heard`` "now",
        "later" (a write with no close, reported once the writes pause) or "never" (see
        :meth:`.cluster.Node.edit_unheard`)."""
        started = time.time_ns()
        root = self.root(node)
        boxes = self.cluster.boxes  # a person stays in their box: a link out of it (a
        folders = [(root / p).parent for p in changed or ()]  # hostile one, applied as it
        if boxes and any(_inside(boxes[node].box, p) is None for p in [*touched, *folders]):
            return  # is) is not theirs to write, move into or delete through
        paths = None
        if changed is not None:
            paths = {p.relative_to(root).as_posix() for p in touched} | set(changed)
            paths |= {a for p in paths for a in _ancestors(p) if not os.path.lexists(root / a)}
        try:
            action()
            self.stats["edits"] += 1
        except OSError:
            return  # the namespace collides (a file where a directory is): nothing happens
        finally:
            nodes = self.cluster.nodes
            pin_directory_times([n.root for n in nodes], started, [n.name for n in nodes])
            if self.cluster.boxes:  # (through a link of theirs, maybe outside the share)
                self.cluster.boxes[node].person_edited()
            if paths is not None:  # an edit through a link lands where the link points
                paths |= {real for p in touched if (real := _inside(root, p)) is not None}
            if heard == "now" or paths is None:
                self.cluster.nodes[node].edit(paths)
            else:
                self.cluster.nodes[node].edit_unheard(paths, later=heard == "later")
        with on_node(self.cluster.nodes[node].name):  # its device's clock
            stamp = entropy.now_ns()
        for path in touched:
            if os.path.lexists(path):
                os.utime(path, ns=(stamp, stamp), follow_symlinks=False)
            if os.path.islink(path) and os.path.exists(path):  # the edit went to its target
                os.utime(os.path.realpath(path), ns=(stamp, stamp))

    def root(self, node: int) -> Path:
        return self.cluster.nodes[node].root

    def _spelled(self, node: int, path: str) -> str:
        """``path`` as its person's filesystem sees it: a name already on disk in another
        Unicode spelling (NFC or NFD) is that name, as on macOS."""
        current, parts = self.root(node), []
        for part in path.split("/"):
            if not part.isascii() and not os.path.lexists(current / part) and current.is_dir():
                wanted = unicodedata.normalize("NFC", part)
                same = [n for n in os.listdir(current) if unicodedata.normalize("NFC", n) == wanted]
                part = same[0] if same else part
            parts.append(part)
            current = current / part
        return "/".join(parts)

    def _path(self, node: int, path: str) -> str | None:
        """The spelling to edit, or None when ``path`` is not in this world."""
        return self._spelled(node, path) if path in self.files or path in DIRS else None

    @rule(node=node_index, path=any_file, data=content)
    def write(self, node: int, path: str, data: bytes) -> None:
        spelled = self._path(node, path)
        if spelled is None:
            return
        self._write_spelled(node, spelled, data)
        if spelled.isascii() and (self.root(node) / spelled).is_file():  # (as recorded)
            written = self.cluster.nodes[node]  # (not race's: a write in the last instant
            # before a window's rename or removal is the race no check can close)
            self.cluster.watch.person_wrote(written.name, written.share, spelled, data)

    def _write_spelled(self, node: int, spelled: str, data: bytes) -> None:
        """The person writes ``data`` at ``spelled`` on ``node`` (its parents made)."""

        def act() -> None:
            target = self.root(node) / spelled
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

        self._fs(node, act, self.root(node) / spelled)

    @rule(node=node_index, path=any_file, data=st.binary(min_size=1, max_size=100))
    def append(self, node: int, path: str, data: bytes) -> None:
        spelled = self._path(node, path)
        if spelled is None:
            return
        target = self.root(node) / spelled
        self._fs(node, lambda: target.open("ab").write(data) if target.is_file() else None, target)

    @rule(node=node_index, path=any_file)
    def truncate(self, node: int, path: str) -> None:
        spelled = self._path(node, path)
        if spelled is None:
            return
        self._fs(node, lambda: os.truncate(self.root(node) / spelled, 1), self.root(node) / spelled)

    @rule(node=node_index, path=any_file, kind=st.sampled_from(UNSEEN), data=content)
    def unseen(self, node: int, path: str, kind: str, data: bytes) -> None:
        """The person changes a file with no event the watcher hears at once (the
        ``unseen`` family): ``truncate`` cuts it to half (truncate(2)), ``append`` writes
        ``data`` at its end and keeps it open (no close), both reported once the writes
        pause; ``mmap`` writes ``data`` over its start through a mapping (no event);
        ``kept`` (on a disk without hard links, with ``nolinks``) writes ``data`` over
        its start in place and puts its time back (as a tool that keeps dates, or a write
        within FAT's 2 s step): no scan sees it, only a window that copies it into the
        store before replacing it (R72)."""
        spelled = self._path(node, path) if "unseen" in self.world else None
        target = self.root(node) / spelled if spelled is not None else None
        if target is None or not target.is_file() or target.is_symlink():
            return
        if kind == "kept":
            if self.no_links_node == node and spelled is not None:
                self._rewrite_under_stat(node, spelled, data)
            return

        def act() -> None:
            size = target.stat().st_size
            if kind == "truncate":
                os.truncate(target, size // 2)
            elif kind == "append":
                with target.open("ab") as handle:
                    handle.write(data or b"+")
            elif size:
                with target.open("r+b") as handle, mmap.mmap(handle.fileno(), size) as mapped:
                    piece = (data or b"+")[:size]
                    mapped[: len(piece)] = bytes(b ^ 0x5A for b in piece)
                    mapped.flush()
            self._wrote_unheard(node, target)

        self._fs(node, act, target, heard="never" if kind == "mmap" else "later")

    def _wrote_unheard(self, node: int, target: Path) -> None:
        """Note the content node ``node``'s person just gave ``target`` unheard: a
        version of it beside one backer recorded at that path without knowing of it (a
        restore's deletion, say) is a second change, not one recorded twice (see
        ``invariants.check_recorded_once``)."""
        data = target.read_bytes()
        self.cluster.nodes[node].written_unheard.add(manifest_of_bytes(data).id)

    def _rewrite_under_stat(self, node: int, spelled: str, data: bytes) -> None:
        """:meth:`unseen`'s ``kept``: the bytes change, the stat does not (size, times,
        inode); the node remembers it (see ``invariants.rewritten_unseen``)."""
        target = self.root(node) / spelled
        looked = target.stat()
        piece = bytes(b ^ 0x5A for b in (data or b"+")[: looked.st_size])
        if not piece:
            return

        def act() -> None:
            with target.open("r+b") as handle:
                handle.write(piece)
            os.utime(target, ns=(looked.st_atime_ns, looked.st_mtime_ns))
            self._wrote_unheard(node, target)

        self._fs(node, act, changed=[spelled], heard="never")
        self.cluster.nodes[node].rewritten_under_stat[spelled] = walk.stat_key_of(target.lstat())

    @rule(node=node_index, path=st.one_of(any_file, dir_path))
    def delete(self, node: int, path: str) -> None:
        spelled = self._path(node, path)
        if spelled is None:
            return

        def act() -> None:
            target = self.root(node) / spelled
            if target.is_dir() and not target.is_symlink():
                remove_tree(target)
            else:
                target.unlink()

        self._fs(node, act, changed=[spelled])

    @rule(
        node=node_index,
        source=st.one_of(any_file, dir_path),
        destination=st.one_of(any_file, dir_path),
    )
    def rename(self, node: int, source: str, destination: str) -> None:
        spelled, onto = self._path(node, source), self._path(node, destination)
        if spelled is None or onto is None:
            return

        def act() -> None:
            target = self.root(node) / onto
            if target.exists() or (self.root(node) / spelled) in target.parents:
                return
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.root(node) / spelled).rename(target)

        self._fs(node, act, changed=[spelled, onto])

    @rule(node=node_index, path=dir_path)
    def mkdir(self, node: int, path: str) -> None:
        self._fs(node, lambda: (self.root(node) / path).mkdir(parents=True), changed=[path])

    @rule(node=node_index, path=any_file, link=st.sampled_from(["f", "../g", "a/c"]))
    def symlink(self, node: int, path: str, link: str) -> None:
        spelled = self._path(node, path)
        if spelled is None:
            return

        def act() -> None:
            (self.root(node) / spelled).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(link, self.root(node) / spelled)

        self._fs(node, act, self.root(node) / spelled)

    @rule(node=node_index, path=any_file)
    def toggle_exec(self, node: int, path: str) -> None:
        spelled = self._path(node, path)
        if spelled is None:
            return

        def act() -> None:
            target = self.root(node) / spelled
            if target.is_file() and not target.is_symlink():
                target.chmod(target.stat().st_mode ^ 0o111)

        self._fs(node, act, self.root(node) / spelled)

    @rule(
        node=node_index,
        op=st.sampled_from(DEEP_OPS),
        level=st.integers(0, DEEP_MOST),
        data=content,
    )
    def deep(self, node: int, op: str, level: int, data: bytes) -> None:
        """The person works on a chain of nested folders deeper than Python's recursion
        limit: ``grow`` makes it (``DEEP_LEVELS`` levels) or adds a few levels at its
        bottom, a file ``z`` at the new bottom; ``rename`` moves the folder at ``level``
        (of the chain's length) aside (``d`` <-> ``e``), the tree below it with it;
        ``delete`` removes it with its tree; ``write`` writes the ``z`` at that level.
        The node's watcher walks what appeared (see :mod:`.watching`)."""
        if "deep" not in self.world:
            return
        root = self.root(node)
        chain = deep_chain(root)
        at = chain[level % len(chain)] if chain else ""
        bottom = chain[-1] if chain else ""
        count = max(DEEP_LEVELS - len(chain), DEEP_GROWTH)
        if op == "grow":
            if len(chain) >= DEEP_MOST:
                return
            grown = "/".join(filter(None, [bottom, *[DEEP_TOP] * count]))
            made, written = bottom + "/" * bool(bottom) + DEEP_TOP, f"{grown}/{DEEP_FILE}"
        elif op == "rename" and at.count("/"):
            parent, _, name = at.rpartition("/")
            made, written = f"{parent}/{DEEP_ASIDE if name == DEEP_TOP else DEEP_TOP}", ""
        elif op in ("delete", "write") and at:
            made, written = "", f"{at}/{DEEP_FILE}" if op == "write" else ""
        else:
            return

        def act() -> None:
            if op == "grow":
                make_levels(root, bottom, count)
            elif op == "rename":
                os.rename(root / at, root / made)
            elif op == "delete":
                remove_tree(root / at)
            if written:
                (root / written).write_bytes(data)

        touched = [root / written] if written else []
        self._fs(node, act, *touched, changed=[at, made] if op == "rename" else [at or made])
        if made and os.path.isdir(root / made):
            self.cluster.nodes[node].edit(reported(root, made))

    @rule(node=node_index, pattern=st.sampled_from(PATTERNS), add=st.booleans())
    def ignore(self, node: int, pattern: str, add: bool) -> None:
        """A person adds or removes a ``.backerignore`` pattern (matching files that exist)."""
        if "ignore" not in self.world:
            return
        target = self.root(node) / IGNORE_FILE

        def act() -> None:
            text = target.read_bytes().decode("utf-8", "replace") if target.is_file() else ""
            lines = text.splitlines()  # (any bytes: another rule may have written it)
            lines = [line for line in lines if line != pattern] + ([pattern] if add else [])
            target.write_text("".join(line + "\n" for line in lines))

        self._fs(node, act, target, changed=None)

    @rule(
        node=node_index,
        seed=st.integers(min_value=0, max_value=2**32),
        rate=st.sampled_from(FAULT_RATES),
    )
    def faults(self, node: int, seed: int, rate: float) -> None:
        """The node's disk starts failing: each of backer's disk calls fails at ``rate``."""
        if "faults" in self.world:
            self.cluster.disks.faults_on(self.root(node), seed, rate)

    @rule(node=node_index)
    def faults_stop(self, node: int) -> None:
        self.cluster.disks.faults_off(self.root(node))

    @rule(node=node_index, budget=st.sampled_from(DISK_BUDGETS))
    def disk_full(self, node: int, budget: int) -> None:
        """The node's disk takes ``budget`` more bytes, then is full."""
        if "disk" in self.world:
            self.cluster.disks.fill(self.root(node), budget)

    @rule(
        node=node_index,
        budget=st.sampled_from(DISK_BUDGETS),
        limit=st.integers(1, 60),
    )
    def disk_fills(self, node: int, budget: int, limit: int) -> None:
        """The node's disk fills while it applies a window: its links deliver (at most
        ``limit`` messages) until it has a plan in progress, then the disk takes only
        ``budget`` more bytes, and up to ``limit`` more messages move: the writer and
        copier threads, their fsyncs and the catalog meet the full disk mid-window."""
        if not {"disk", "fills"} & self.world or self.cluster.nodes[node].down:
            return
        if not self.cluster.linked(node):
            self.cluster.connect(node, self.cluster.random.choice(range(len(self.cluster.nodes))))
        self.cluster.applying(node, limit, window=True)
        self.cluster.disks.fill(self.root(node), budget)
        before = self.cluster.traffic.bytes
        self.cluster.deliver_around(node, limit)
        self.stats["bytes"] += self.cluster.traffic.bytes - before

    @rule(node=node_index)
    def disk_freed(self, node: int) -> None:
        self.cluster.disks.free(self.root(node))

    @rule(
        a=node_index, b=node_index, cut=st.one_of(st.none(), st.integers(min_value=1, max_value=30))
    )
    def sync(self, a: int, b: int, cut: int | None) -> None:
        if a == b:
            return
        before = self.cluster.traffic.bytes
        complete = self.cluster.sync(a, b, cut)
        if complete and not self.cluster.resident:  # (what a one-shot sync reports on)
            for node in (a, b):
                check_said_what_is_missing(self.cluster, node)
        self.stats["bytes"] += self.cluster.traffic.bytes - before
        self.stats["syncs"] += 1
        self.stats["cuts"] += cut is not None

    @rule(a=node_index, b=node_index)
    def connect(self, a: int, b: int) -> None:
        """A long-lived link, delivered a few messages at a time by ``deliver``."""
        self.cluster.connect(a, b)

    @rule(a=node_index, b=node_index, count=st.integers(min_value=1, max_value=40))
    def deliver(self, a: int, b: int, count: int) -> None:
        before = self.cluster.traffic.bytes
        self.cluster.deliver(a, b, count)
        self.stats["bytes"] += self.cluster.traffic.bytes - before

    @rule(a=node_index, b=node_index)
    def disconnect(self, a: int, b: int) -> None:
        self.cluster.disconnect(a, b)

    @rule(node=node_index, during=st.integers(min_value=0, max_value=30))
    def scan(self, node: int, during: int = 0) -> None:
        """A file watcher firing: the node records its edits and tells its open links;
        resident, up to ``during`` messages move on its links while it hashes."""
        before = self.cluster.traffic.bytes
        self.cluster.scan(node, during if self.cluster.resident else 0)
        self.stats["bytes"] += self.cluster.traffic.bytes - before

    @rule(node=node_index, path=any_file, data=content, limit=st.integers(1, 60))
    def race(self, node: int, path: str, data: bytes, limit: int) -> None:
        """The person writes a file while the node applies a plan: deliveries go on (at
        most ``limit``) until the node is applying (if nothing comes, a linked peer's
        person writes ``path`` first), then one of the files it is about to rename into
        place (else ``path``) is written."""
        if not self.cluster.resident:
            return
        before = self.cluster.traffic.bytes
        if not self.cluster.linked(node):  # its dialer reaches a peer
            self.cluster.connect(node, self.cluster.random.choice(range(len(self.cluster.nodes))))
        planned = self.cluster.applying(node, limit)
        peers = self.cluster.linked(node)
        if not planned and peers:  # a peer's person writes it first, its watcher pushes
            peer = self.cluster.random.choice(peers)
            self.write(peer, path, data + b"'")
            self.cluster.scan(peer)
            planned = self.cluster.applying(node, limit)
        self.stats["bytes"] += self.cluster.traffic.bytes - before
        if planned:
            self.stats["races"] += 1
            path = self.cluster.random.choice(planned)
            spelled: str | None = path
        else:
            spelled = self._path(node, path)
        if spelled is not None:
            self._write_spelled(node, spelled, data)

    @rule(kind=st.sampled_from(CRAFTS), pick=st.integers(0, 99))
    def craft(self, kind: str, pick: int) -> None:
        """The hostile member records a crafted change (or its person writes a 2 MiB
        ``.backerignore``, which its watcher records)."""
        hostile = self.cluster.hostile
        if hostile is None or hostile.index < 0:
            return
        if kind == "ignore_big":
            target = self.root(hostile.index) / IGNORE_FILE
            self._fs(hostile.index, lambda: target.write_bytes(BIG_RULES), target, changed=None)
            self.cluster.scan(hostile.index)
            return
        self.cluster.craft(kind, pick)

    @rule(node=node_index)
    def stop(self, node: int) -> None:
        """``backer run`` stops (its links closed); others go on without it."""
        if self.cluster.resident:
            self.cluster.stop(node)
            self.stats["stops"] += 1

    @rule(node=node_index)
    def start(self, node: int) -> None:
        """``backer run`` starts again: reopened from disk, a full scan, every peer dialled."""
        self.cluster.start(node)

    @rule(node=node_index, wait=st.sampled_from(WAITS))
    def prune(self, node: int, wait: int) -> None:
        """``wait`` ms pass, then the node prunes its kept contents: nothing inside the
        retention window goes, and no live version it knows becomes unrecoverable."""
        if "retention" not in self.world or self.cluster.nodes[node].down:
            return
        wait = min(wait, EARLY_MS - self.waited)
        self.clock.advance(wait)
        self.waited += wait
        self.cluster.nodes[node].open()
        with self.cluster.disks.paused():
            before = recoverable(self.cluster, node)
        report = self.cluster.prune(node)
        if report is not None:
            self.stats["prunes"] += 1
            self.stats["pruned_versions"] += report.versions
            self.stats["pruned_bytes"] += report.bytes
        with self.cluster.disks.paused():
            check_retention_window(self.cluster, [node], self.cluster.learned)
            check_still_recoverable(self.cluster, node, before)

    @rule(node=node_index, percent=st.sampled_from(CAPS))
    def cap(self, node: int, percent: str) -> None:
        """The person caps the node's kept contents (``backer config max-disk``)."""
        if "retention" not in self.world or self.cluster.nodes[node].down:
            return
        share = self.cluster.nodes[node].open()
        with share.db.conn:
            retention_config.set_value(share.catalog, "max-disk", percent)

    @rule(node=node_index, offset=st.sampled_from(OFFSETS))
    def set_clock(self, node: int, offset: int) -> None:
        """The node's wall clock is stepped to ``offset`` ms off (NTP correcting it, or its
        person setting it) while backer runs."""
        if "clocks" in self.world:
            self.clock.set(self.cluster.nodes[node].name, offset)

    @rule(node=node_index, offset=st.sampled_from(OFFSETS))
    def reboot(self, node: int, offset: int) -> None:
        """The device reboots: its process is lost (no clean close) and it boots with its
        clock ``offset`` ms off (0: NTP set it right); a resident node runs again."""
        if "clocks" not in self.world:
            return
        name, down = self.cluster.nodes[node].name, self.cluster.nodes[node].down
        self.cluster.crash(node)
        self.clock.set(name, offset)
        self.clock.reboot(name)
        if self.cluster.resident and not down:
            self.cluster.nodes[node].down = True  # (its process is gone: it starts again)
            self.cluster.start(node)

    @rule(node=node_index)
    def prune_all(self, node: int) -> None:
        """``backer prune --all`` (a full disk): every replaced or deleted content whose
        bytes no file of the share holds goes, however recent (R37: a version a device
        whose clock was ahead replaced stayed)."""
        if "clocks" not in self.world or self.cluster.nodes[node].down:
            return
        self.cluster.nodes[node].open()
        with self.cluster.disks.paused():
            before = recoverable(self.cluster, node)
        if self.cluster.prune(node, everything=True) is not None:
            self.stats["prunes"] += 1
        with self.cluster.disks.paused():
            check_all_pruned(self.cluster, node)
            check_still_recoverable(self.cluster, node, before)

    @rule(node=node_index, path=st.one_of(any_file, dir_path), pick=st.integers(0, 99))
    def restore_version(self, node: int, path: str, pick: int) -> None:
        """The person restores a recorded version of ``path`` (deleted or not) picked
        from its history: ``backer restore PATH --version ID``."""
        if "revisions" not in self.world or self.cluster.nodes[node].down:
            return
        history = [
            h
            for h in self.cluster.nodes[node].open().catalog.history(path)
            if h.version.kind != Kind.DELETED
        ]
        if history:
            chosen = history[pick % len(history)]
            request = {"op": "restore", "path": path, "version": chosen.version_id}
            self._revise(node, request, (path, chosen.version))

    @rule(node=node_index, path=st.sampled_from(["", *DIRS]), pick=st.integers(0, 99))
    def restore_at(self, node: int, path: str, pick: int) -> None:
        """The person brings a folder (or the whole share) back to a past moment, just
        after one of its recorded versions: ``backer restore DIR --at WHEN``."""
        if "revisions" not in self.world or self.cluster.nodes[node].down:
            return
        catalog = self.cluster.nodes[node].open().catalog
        moments = sorted({v.time_ms for _, _, v in catalog.versions_under(path)})
        if moments:
            self._revise(node, {"op": "restore", "path": path, "at": moments[pick % len(moments)]})

    @rule(node=node_index, pick=st.integers(0, 99), how=st.sampled_from(RESOLUTIONS))
    def resolve(self, node: int, pick: int, how: str) -> None:
        """The person resolves one of the conflicts ``backer conflicts`` lists: ``backer
        resolve PATH --keep VERSION | --keep-both | --keep-newest``."""
        if "revisions" not in self.world or self.cluster.nodes[node].down:
            return
        found = revisions.conflicts(self.cluster.nodes[node].open().catalog)
        if not found:
            return
        conflict = found[pick % len(found)]
        keep = conflict.contenders[pick % len(conflict.contenders)].version_id
        request = {
            "op": "resolve",
            "path": conflict.path,
            "keep": keep if how == "keep" else None,
            "keep_both": how == "keep-both",
        }
        recorded = self._revise(node, request)
        catalog = self.cluster.nodes[node].open().catalog if recorded else None
        for c in conflict.contenders if catalog is not None else ():
            replacing = {  # (its scan's versions may have reached peers without these)
                vid
                for vid in recorded
                if (v := catalog.version(vid)) is not None and c.copy_id in v.supersedes
            }
            if c.copy_path and c.copy_id and replacing:
                self.resolved[c.copy_path, c.copy_id] = replacing

    def _revise(
        self, node: int, request: dict[str, Any], restored: tuple[str, Version] | None = None
    ) -> set[str]:
        """Run a revision on ``node``; check that history only grew (every version it
        knew is still there) and that a version restored is there as a new version of
        its path. Returns the ids of the versions it recorded."""
        share = self.cluster.nodes[node].open()
        before = {vid for (vid,) in share.catalog.conn.execute("SELECT vid FROM versions")}
        said = self.cluster.revise(node, request)
        share = self.cluster.nodes[node].share
        if said is None or share is None:
            return set()
        after = {vid for (vid,) in share.catalog.conn.execute("SELECT vid FROM versions")}
        if before - after:
            raise InvariantBroken(f"{request['op']} rewrote history: {sorted(before - after)[:3]}")
        if said.startswith("refused: "):
            self.stats["refused"] += 1
            return set()
        self.stats["revised"] += bool(after - before)  # (else: nothing to do)
        if restored is not None and not said.startswith("nothing to restore"):
            path, version = restored
            live = share.catalog.live_versions(path)
            if not any(vid not in before and v.same_content(version) for vid, v in live.items()):
                raise InvariantBroken(f"{said!r} recorded no new version of {path!r}")
        return after - before

    @rule(node=node_index)
    def backup(self, node: int) -> None:
        self.cluster.backup(node)

    @rule(node=node_index)
    def restore(self, node: int) -> None:
        """The device comes back from an old backup of its ``.backer/``."""
        if self.cluster.restore(node):
            self.stats["restores"] += 1

    @rule(
        node=node_index,
        op=st.sampled_from(KILLED_IN),
        nth=st.integers(1, 40),
        other=node_index,
        pick=st.integers(0, 99),
    )
    def kill(self, node: int, op: str, nth: int, other: int, pick: int) -> None:
        """The node's process is killed before its ``nth`` durable step inside ``op``
        (with peer ``other``; ``pick`` picks what a delivery, prune or restore does), then
        starts again as after SIGKILL: it opens the share, scans, and (resident) dials
        its peers. Nothing it recorded is recorded again; what it keeps stays readable."""
        cluster = self.cluster
        if "kills" not in self.world or cluster.nodes[node].down:
            return
        if node == other:
            other = (node + 1) % len(cluster.nodes)
        root, share = self.root(node), cluster.nodes[node].open()
        cluster.nodes[node].killed = False
        cluster.disks.kill_at(root, nth, share.db.conn)
        try:
            self._killed_in(node, op, other, pick)
        finally:
            if cluster.disks.killed(root):  # (ended outside a guarded step of backer's)
                cluster.crash(node, killed=True)
            share = cluster.nodes[node].share
            cluster.disks.disarm(root, share.db.conn if share is not None else None)
        if not cluster.nodes[node].killed:
            return
        self.stats["kills"] += 1
        if cluster.resident:
            cluster.nodes[node].down = True
            cluster.start(node)
        else:
            cluster.scan(node)
        with cluster.disks.paused():
            check_recorded_once(cluster, node)
            check_kept_readable(cluster, node)

    def _killed_in(self, node: int, op: str, other: int, pick: int) -> None:
        """Run the operation a kill ends (see :meth:`kill`)."""
        cluster = self.cluster
        if op == "scan":
            self.scan(node, pick % 30)
        elif op == "sync":
            self.sync(node, other, None)
        elif op == "deliver":
            if not cluster.linked(node):
                cluster.connect(node, other)
            cluster.deliver_around(node, pick + 1)
        elif op == "prune":
            cluster.prune(node, everything=pick % 2 == 1)
        else:
            catalog = cluster.nodes[node].open().catalog
            moments = sorted({v.time_ms for _, _, v in catalog.versions_under("")})
            if moments:
                request = {"op": "restore", "path": "", "at": moments[pick % len(moments)]}
                cluster.revise(node, request)

    @rule(node=node_index)
    def crash(self, node: int) -> None:
        self.cluster.crash(node)
        self.stats["crashes"] += 1

    @invariant()
    def mount_mode_shown(self) -> None:
        """(Not a check: a disk without permission bits shows its mount's mode on what
        was made during the step, as exFAT does at once.)"""
        for node in self.cluster.nodes:
            self.cluster.disks.show_mount_mode(node.root)

    @invariant()
    def no_saved_file_replaced(self) -> None:
        replaced = self.cluster.disks.replaced  # (see simulations.faults.Disks.save_first)
        assert not replaced, f"a file the person had just saved was replaced: {replaced}"

    @invariant()
    def no_stray_temp_files(self) -> None:
        for node in self.cluster.nodes:  # every scan sweeps what no assembly is using
            assert not node.stray_after_scan, node.stray_after_scan

    def abandon(self) -> None:
        """Stop without the final checks (a step already failed)."""
        self.cluster.close()
        self.seeded.close()

    def teardown(self) -> None:
        try:
            self.cluster.disks.calm()  # faults stop, disks are freed; then the network heals
            if self.cluster.resident:
                check_pushed(self.cluster)
                self.cluster.resident = False  # the heal below: one-shot syncs, as before
            self.cluster.expel_hostile()  # the honest nodes are checked among themselves
            converge(self.cluster)
            self.stats["conflicts"] = self.cluster.conflicts
            check_quiescent(self.cluster)
            check_resolved(self.cluster, self.resolved)
            if "retention" in self.world:  # time passes; every node prunes its full history
                for index in range(len(self.cluster.nodes)):
                    self.prune(index, self.cluster.random.choice(WAITS))
                converge(self.cluster)  # (what each announced it no longer holds)
                check_quiescent(self.cluster)
                check_retention_window(self.cluster, learned=self.cluster.learned)
            if "clocks" in self.world:
                check_own_times_ascend(self.cluster)
            self.fingerprint = fingerprint(self.cluster)
            check_order_independence(self.cluster, self.cluster.random)
            check_bytes_scale_with_difference(self.cluster, self.cluster.random)
            if self.cluster.hostile is not None:
                check_honest_paths(self.cluster)
                self.cluster.check_sandboxes()
        finally:
            self.cluster.close()
            self.seeded.close()
