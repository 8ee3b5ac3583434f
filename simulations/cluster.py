"""A cluster of real backer nodes in one process, connected by in-memory sessions.

Each node is a real share (journal, state, scanner, materializer) in its own temp
directory, with one :class:`~backer.model.replicator.Replicator` shared by all of its open
connections, as in ``backer serve``. A link is a pair of sans-IO sessions whose
messages go through the real framing into two FIFO queues (a stream is ordered); the
seeded scheduler decides which link and which direction delivers next, so deliveries
across links are delayed and reordered, and files can change while a link is half way.
A link can be cut at any message; a node can crash (its in-memory state, sessions
included, is dropped; disk and journal stay). In a *resident* cluster nodes behave as
``backer run`` does: links stay open after a sync, a scan hashes while the node's links
go on delivering (and applying) before it records, and a node can stop (its links
closed, its process state discarded) and start again, redialling every peer. A node's
disk can fail or fill up
(:mod:`.faults`); an error that escapes backer there ends that node's process, as it
would end ``backer sync``. Around every step backer takes, :mod:`.world` checks what
it did to each node's files.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import random
import shutil
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.signing

from backer.errors import BackerError
from backer.model import entropy, replicator, revisions
from backer.model.materializer import DiskFull, stale_temps
from backer.model.records import Kind
from backer.model.share import ScanSummary, Share
from backer.node import commands
from backer.protocol.session import Session
from backer.protocol.wire import FrameReader, ProtocolError
from backer.scanner import walk
from backer.scanner.ignore import IGNORE_FILE, IgnoreRules
from backer.versioner.prune import DROP_ALL, PruneReport, prune_share

from .clocks import Learned
from .faults import Disks
from .hostile import OUTSIDE, Hostile, Sandbox, check_sandboxes
from .world import (
    InvariantBroken,
    Watch,
    check_folder_opens,
    ignored,
    on_node,
    pin_directory_times,
    reachable_temps,
    remove_tree,
)

UNLIMITED_PAGES = 2**32 - 2  # SQLite's own largest max_page_count
MEDDLE_RATE = 0.2  # share of the file creations in a boxed node's folders raced by a swap
LIVELOCK_EVENTS = 500  # events the nodes may record between them while links settle
LIVELOCK_EVERY = 100  # messages between two looks at how many they recorded


class Replicator(replicator.Replicator):
    """backer's replicator, checked where a full disk stops a window: each of the
    window's files that it did not write is reported as a problem (the device lists it;
    never silently "in sync"). A disk that filled while the writer thread wrote a
    window's chunks stopped it with an empty report: nothing was listed (R32)."""

    def __init__(self, share: Share, node: str) -> None:
        super().__init__(share)
        self.node = node
        self.silent: list[str] = []  # what broke that rule

    def _stop(self, problem: DiskFull) -> None:
        window = list(self.window_operations) if self.assembly is not None else []
        super()._stop(problem)
        if not window:
            return
        report = self.reports[-1]
        told = {*report.written, *report.kept_local_edits}
        for op in window:
            reported = ("apply", op.path) in self.share.problems
            if op.version.kind == Kind.FILE and op.path not in told and not reported:
                self.silent.append(
                    f"{self.node}'s window stopped by a full disk left out {op.path!r} and "
                    "reported no problem with it"
                )


@dataclass
class Traffic:
    messages: int = 0
    bytes: int = 0


@dataclass
class Node:
    """One device: a key, a directory, and (unless crashed) an open share."""

    name: str
    key: nacl.signing.SigningKey
    root: Path
    home: Path  # the device's own directory (its key's place): never restored with a share
    share: Share | None = None
    replicator: Replicator | None = None
    crashes: int = 0
    conflicts: int = 0  # resolved by replicators this node has had
    stray_after_scan: list[Path] = field(default_factory=list)  # temps a scan left behind
    edited: bool = True  # its person (or a lost process) changed files since its last scan
    edits: int = 0  # its person's edits so far (one made while a scan ran is not seen by it)
    touched: set[str] | None = None  # the paths edited since (None: a full scan is due)
    down: bool = False  # stopped: no process, no links, until it starts again
    rules_seen: bytes | None = None  # its .backerignore as its last whole scan walked
    rules_moved: bool = False  # a scan since then saw other rules (they may be back)
    killed: bool = False  # killed at a kill point (the harness restarts it)
    heard_later: set[str] = field(default_factory=set)  # written, no close: its watcher
    # reports them once the writes pause (at its next scan, not the one right after)
    unheard: set[str] = field(default_factory=set)  # changed with no event at all (mmap)
    stale: set[str] = field(default_factory=set)  # what a read for a peer found changed:
    # ``backer run`` scans them at once (see Cluster.scan_stale)
    rewritten_under_stat: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    # files its person rewrote in place keeping size and time: path -> their stat key
    written_unheard: set[bytes] = field(default_factory=set)  # the contents (manifest ids)
    # its person gave files with no event heard at once (the ``unseen`` family)

    def open(self) -> Share:
        if self.share is None:
            with on_node(self.name):
                self.share = Share(self.root, self.key, home=self.home)
        return self.share

    def hub(self) -> Replicator:
        """The replicator all of this node's open links share."""
        if self.replicator is None:
            self.replicator = Replicator(self.open(), self.name)
            self.replicator.store.on_stale = self.stale.add
        return self.replicator

    def scan(
        self,
        meanwhile: Callable[[], None] | None = None,
        whole: bool = True,
        off_loop: bool = False,
        mid_walk: bool = False,
    ) -> None:
        """Scan (everything, or as a watcher does only the paths edited since the last
        scan; in the loop, or ``off_loop`` as ``backer run`` does), and relay to the
        open links. A rule only stops syncing: no deletion is recorded for a path the
        rules ignore. A node's own applied writes are never recorded as its edits: a
        scan with no edit since the last one records nothing.
        ``meanwhile`` is what the node's links do while an off-loop scan hashes
        (``mid_walk``: before its first file; see :func:`scan_share`)."""
        share = self.open()
        if self.touched is not None:  # (what its watcher reported since the last scan)
            self.touched |= self.heard_later | self.stale
        self.heard_later.clear()
        self.stale.clear()
        edits = self.edits
        rules, local = IgnoreRules.load(self.root), share.catalog.local_entries()
        walked = self._rules()  # (the walk reads them as it starts: a rule its links bring
        moved = self.rules_moved or walked != self.rules_seen  # in meanwhile binds it not)
        parents = set() if self.edited else _parents_of_live(share)
        paths = None if whole or self.touched is None else sorted(self.touched)
        hub = self.hub()
        summary = scan_share(
            share,
            paths,
            meanwhile if off_loop else None,
            mid_walk,
            lambda: (hub.journal_grew(), hub.advance()),
        )
        if self.share is None:  # its process ended while the scan hashed
            raise Crashed
        for path in summary.deleted:
            if ignored(rules, path, path in local and stat.S_ISDIR(local[path].mode)):
                raise InvariantBroken(f"{self.name} recorded the deletion of ignored {path!r}")
        rules_now = self._rules()
        moved = moved or rules_now != self.rules_seen
        recorded = sorted(summary.added + summary.modified + summary.deleted)
        unheard, self.unheard = self.unheard, self.unheard - set(recorded) - set(paths or ())
        if paths is None:
            self.unheard = set()  # (what this scan looked at, or recorded, is heard now)
        # (a folder whose entry changed is recorded with its mtime, whoever moved it:
        # a window's temp in it, for one; see backer.scanner.walk.classify)
        folders = {path.rpartition("/")[0] for path in unheard.intersection(recorded)}
        own = set(recorded) - parents - unheard - folders - set(self.rewritten_under_stat)
        for path in recorded:  # (a window had it hashed again: seen now, R72)
            self.rewritten_under_stat.pop(path, None)
        if summary.events and not self.edited and not moved and own:
            raise InvariantBroken(
                f"{self.name} recorded its own applied writes as edits: {recorded[:5]}"
            )
        # recorded later, or made while the scan ran (a person who saved a file where a
        # window moving files meanwhile was about to put one: see faults.save_first)
        self.edited = bool(summary.errors or summary.waiting) or self.edits != edits
        # A received rule records what it stops ignoring, as it is: a file the person
        # wrote while it was ignored is theirs, even once the rules are back as they were
        # at the last whole scan (a rule added, then removed).
        self.rules_moved = moved and paths is not None
        if paths is None:
            self.rules_seen = walked
        if self.edited or paths is None:
            self.touched = None if self.edited else set()
        else:
            self.touched.clear()
        self.stray_after_scan = self.stray_temp_files()
        if summary.events:
            self.hub().journal_grew()
        self.hub().advance()  # (as backer run does after each scan: a plan may have waited
        # for its chunk index)
        if meanwhile is not None and not (off_loop and hasattr(share, "scan_off_loop")):
            meanwhile()  # the scan held the loop: its links move only after it

    def _rules(self) -> bytes:
        rules_file = self.root / IGNORE_FILE
        return rules_file.read_bytes() if rules_file.is_file() else b""

    def edit(self, paths: Iterable[str] | None) -> None:
        """Its person changed ``paths`` (None: anything, e.g. the ignore rules)."""
        self.edited = True
        self.edits += 1
        if paths is None or self.touched is None:
            self.touched = None
        else:
            self.touched.update(paths)

    def edit_unheard(self, paths: Iterable[str], later: bool) -> None:
        """Its person changed ``paths`` with no event its watcher hears at once:
        ``later`` (written and not closed) once the writes pause, else never (mmap)."""
        self.edit([])
        (self.heard_later if later else self.unheard).update(paths)

    def edit_one(self, path: str) -> None:
        self.edit([path])

    def crash(self, killed: bool = False) -> None:
        """Lose everything in memory (no snapshot saved, no clean close): a window half
        renamed into place and not committed is on disk as if edited there. ``killed``:
        at a kill point (:meth:`.faults.Disks.kill_at`), where the harness knows what
        is on disk: its person's edits are as they were; what backer wrote is no edit."""
        self._drop_replicator()
        if self.share is not None:
            self.share.db.conn.close()
            if self.share._lock is not None:
                self.share._lock.close()
            self.share = None
            self.crashes += 1
            if killed:
                self.killed = True
            else:
                self.edit(None)

    def stop(self) -> None:
        """A clean stop (its links already closed): the share is closed, the process
        state is gone; nothing runs until :meth:`start`."""
        self._drop_replicator()
        if self.share is not None:
            self.share.close()
            self.share = None
        self.down = True

    def _drop_replicator(self) -> None:
        if self.replicator is not None:
            self.conflicts += self.replicator.stats.conflicts_resolved
            self.replicator = None

    def stray_temp_files(self) -> list[Path]:
        """Temp files that no assembly in progress is using (a crash's, or one whose
        directory the person renamed mid-transfer): the next scan must sweep them."""
        found = reachable_temps(self.root)
        if self.share is None:
            return found
        return stale_temps(self.root, self.share.catalog, found, self.share.temps_in_use)


def _parents_of_live(share: Share) -> set[str]:
    """Directories that hold a live entry but are not live themselves (deleted on one
    device while another wrote inside): the materializer makes them to write what they
    hold, and the next scan records them, once, with the directory each is made in (its
    time changed: a new entry; see docs/simulations.md)."""
    live: dict[str, bool] = {}
    for path, _, version in share.catalog.all_live():
        live[path] = live.get(path, False) or version.kind != Kind.DELETED
    held = {path.rpartition("/")[0] for path, alive in live.items() if alive}
    parents: set[str] = set()
    for folder in held:  # (each with those above it, up to one already there: a deep
        while folder and folder not in parents:  # tree's levels are not joined again)
            parents.add(folder)
            folder = folder.rpartition("/")[0]
    made = {p for p in parents if not live.get(p, False)}
    return made | {p.rpartition("/")[0] for p in made if "/" in p}


def _pruned(share: Share) -> set[tuple[str, int]]:
    """The versions whose bytes the node dropped, and when (its table, once there)."""
    conn = share.catalog.conn
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'pruned'").fetchone() is None:
        return set()
    return set(conn.execute("SELECT vid, ms FROM pruned"))


class Crashed(Exception):
    """The node's process ended while one of its scans was hashing."""


def scan_share(
    share: Share,
    paths: list[str] | None,
    meanwhile: Callable[[], None] | None,
    mid_walk: bool = False,
    recorded: Callable[[], object] | None = None,
) -> ScanSummary:
    """Scan as ``backer run`` does. Its off-loop scan hashes in a worker thread while the
    event loop goes on (deliveries, applies): ``meanwhile`` runs there, between the
    hashing and the recording (``mid_walk``: between the walk's stats and the first
    file's hashing), in a private loop whose executor runs the work at once (so a seed
    replays). ``recorded`` is called as the node's is, once the scan's versions are in
    the journal and before their chunk index is written (the node pushes them and plans).
    Without ``meanwhile`` (or a share without an off-loop scan), the scan runs in the
    loop."""
    off_loop = getattr(share, "scan_off_loop", None)
    if off_loop is None or meanwhile is None:
        return share.scan() if paths is None else share.scan(paths=paths)
    loop = asyncio.new_event_loop()
    loop.set_default_executor(_Inline(meanwhile, mid_walk))
    try:
        return loop.run_until_complete(off_loop(paths, recorded=recorded))
    finally:
        loop.close()


class _Inline(concurrent.futures.ThreadPoolExecutor):
    """Runs each job at once, in the caller's thread (asyncio wants a thread pool as the
    default executor; this one never starts a thread); during the first job (before
    it hashes a file, ``mid_walk``) or after it, the rest of the world moves."""

    def __init__(self, meanwhile: Callable[[], None] | None, mid_walk: bool) -> None:
        super().__init__(max_workers=1)
        self.meanwhile, self.mid_walk = meanwhile, mid_walk

    def _world_moves(self) -> None:
        meanwhile, self.meanwhile = self.meanwhile, None
        if meanwhile is not None:
            meanwhile()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        real = walk.read_stable

        def read_stable(*args: Any, **kwargs: Any) -> Any:
            walk.read_stable = real
            self._world_moves()
            return real(*args, **kwargs)

        if self.mid_walk and self.meanwhile is not None:
            walk.read_stable = read_stable
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the awaiting coroutine, as a thread would
            future.set_exception(exc)
        finally:
            walk.read_stable = real
        self._world_moves()  # (if no file was hashed)
        return future


@dataclass
class Link:
    """An open connection: ``queues[i]`` holds the frames on their way to ``sessions[i]``."""

    sessions: tuple[Session, Session]
    readers: tuple[FrameReader, FrameReader] = field(
        default_factory=lambda: (FrameReader(), FrameReader())
    )
    queues: tuple[list[bytes], list[bytes]] = field(default_factory=lambda: ([], []))

    @property
    def quiet(self) -> bool:
        return not (self.queues[0] or self.queues[1])


@dataclass
class Cluster:
    base: Path
    seed: int
    size: int
    nodes: list[Node] = field(default_factory=list)
    traffic: Traffic = field(default_factory=Traffic)
    links: dict[tuple[int, int], Link] = field(default_factory=dict)
    disks: Disks = field(default_factory=Disks)
    watch: Watch = field(default_factory=Watch)
    aborts: int = 0  # node processes ended by a disk error
    rolled_back: bool = False  # some node's .backer/ came back from an old backup
    resident: bool = False  # nodes run as ``backer run``: see the module's docstring
    boxed: bool = False  # one node is hostile, every node lives in a sandbox (see .hostile)
    hostile: Hostile | None = None
    boxes: list[Sandbox] = field(default_factory=list)
    learned: Learned | None = None  # (clocks) when each node learned of each version
    _acting: int = 0

    def __post_init__(self) -> None:
        self.watch.placeholders = self.disks.made_placeholders
        self.random = random.Random(self.seed)
        keys = [nacl.signing.SigningKey(self.random.randbytes(32)) for _ in range(self.size)]
        for index, key in enumerate(keys):
            root, home = self.base / f"node{index}", self.base / f"home{index}"
            if self.boxed:
                box = Sandbox(self.base / f"box{index}", f"node{index}")
                box.make()
                self.boxes.append(box)
                root, home = box.root, box.home
            else:
                root.mkdir(parents=True)
            self.nodes.append(Node(f"node{index}", key, root, home))
            self.disks.track(root)
        if self.boxed:  # never node 0: the honest nodes converge through it
            index = self.random.randrange(1, self.size)
            self.hostile = Hostile(index, bytes(keys[index].verify_key))
            for box, node in zip(self.boxes, self.nodes, strict=True):  # (links to their
                seed = self.random.getrandbits(32)  # outside/: the sandbox checks it)
                person = node.edit_one
                self.disks.meddle(box.root, box.box / OUTSIDE, seed, MEDDLE_RATE, person)
        with on_node(self.nodes[0].name):
            founder = Share.create(self.nodes[0].root, keys[0], home=self.nodes[0].home)
        self.nodes[0].share = founder
        for node in self.nodes[1:]:
            with on_node(self.nodes[0].name):
                founder.admit(bytes(node.key.verify_key), node.name)
            joined = (founder.share_id, founder.share_key)
            with on_node(node.name):
                node.share = Share.create(node.root, node.key, joining=joined, home=node.home)

    def close(self) -> None:
        self.links.clear()
        for node in self.nodes:
            if node.share is not None:
                node.share.close()
                node.share = None
        with contextlib.suppress(OSError):
            remove_tree(self.base)

    @property
    def conflicts(self) -> int:
        return sum(
            n.conflicts + (n.replicator.stats.conflicts_resolved if n.replicator else 0)
            for n in self.nodes
        )

    @contextlib.contextmanager
    def acting(self) -> Iterator[None]:
        """A step of backer's: what it did to each node's files is checked afterwards."""
        self._acting += 1
        started, opens = time.time_ns(), self.disks.folder_opens
        if self._acting == 1:
            self.watch.start([n.root for n in self.nodes])
            self.limit_catalogs()
            if self.learned is not None:
                self.learned.step_starts([n.name for n in self.nodes])
        try:
            yield
        finally:
            self._acting -= 1
            if self._acting == 0:
                self.limit_catalogs(lifted=True)
        if self._acting == 0:
            nodes = self.nodes
            folders = pin_directory_times([n.root for n in nodes], started, [n.name for n in nodes])
            check_folder_opens(self.disks.folder_opens - opens, folders + self.watch.folders)
            for node in self.nodes:
                if node.replicator is not None and node.replicator.silent:
                    raise InvariantBroken(node.replicator.silent[0])
            names = [n.name for n in self.nodes]
            self.watch.check(names, [n.root for n in self.nodes], [n.share for n in self.nodes])
            self.check_sandboxes()
            for node in self.nodes:  # a failing disk may have left a step half done
                if self.disks.active(node.root):
                    node.edit(None)
            self.note_learned()

    def note_learned(self) -> None:
        """(``clocks``) Note the versions each node holds now and which of them are live
        (see :class:`Learned`), from its database on disk if its process is gone."""
        if self.learned is None:
            return
        for node in self.nodes:
            if node.share is not None:
                self._note_learned(node.name, node.share.catalog.conn)
                continue
            database = node.root / ".backer" / "backer.db"
            uri = f"{database.as_uri()}?mode=ro"
            with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
                self._note_learned(node.name, conn)

    def _note_learned(self, name: str, conn: sqlite3.Connection) -> None:
        assert self.learned is not None
        held = {vid for (vid,) in conn.execute("SELECT vid FROM versions")}
        live = {vid for (vid,) in conn.execute("SELECT vid FROM live")}
        self.learned.note(name, held, live)

    def limit_catalogs(self, lifted: bool = False) -> None:
        """A full disk has no room for the catalog either (SQLITE_FULL, 'database or
        disk is full'): in a step of backer's, the database of a node whose disk takes
        ``budget`` more bytes may grow by that many bytes' pages, as the writes do
        (``lifted``: the step is over; the harness's own reads create what they need)."""
        for node in self.nodes:
            if node.share is None:
                continue
            conn, budget = node.share.db.conn, self.disks.budget(node.root)
            limit = UNLIMITED_PAGES
            if budget is not None and not lifted:
                pages = conn.execute("PRAGMA page_count").fetchone()[0]
                limit = pages + budget // conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {limit}")

    def check_sandboxes(self) -> None:
        """Nothing written outside any node's share (see :mod:`.hostile`)."""
        if self.boxed:
            check_sandboxes(self.base, self.boxes, [f"node{i}" for i in range(len(self.boxes))])

    def is_hostile(self, index: int) -> bool:
        return self.hostile is not None and self.hostile.index == index

    def guarded(self, index: int, action: Callable[[], object]) -> bool:
        """Run backer code of one node; an error while its disk is failing ends that
        node's process (False), as it ends ``backer sync``, and so does any error of the
        hostile node's modified client; any other error is a bug."""
        root = self.nodes[index].root
        try:
            with on_node(self.nodes[index].name):
                action()
        except (ProtocolError, Crashed):
            if not self.disks.killed(root):
                raise  # the peer's fault: the session is refused; or the process is gone
        except Exception:
            if self.disks.killed(root):
                pass  # what the process did after its kill point is no more
            elif self.hostile is not None and self.is_hostile(index):
                self.hostile.crashes += 1
                self.crash(index)
                return False
            elif not self.disks.active(root):
                raise
            else:
                self.aborts += 1
                self.crash(index)
                return False
        if self.disks.killed(root):  # its process ends at the kill point
            self.crash(index, killed=True)
            self.disks.disarm(root, None)
            return False
        return True

    # -- links ------------------------------------------------------------------------------

    def connect(self, a: int, b: int) -> Link | None:
        """Open a link (if none is open): both nodes scan (resident nodes do not: their
        watchers keep the journal current), then their sessions start."""
        if a == b or self.nodes[a].down or self.nodes[b].down:
            return None
        key = (min(a, b), max(a, b))
        if key in self.links:
            return self.links[key]
        with self.acting():
            if not self.resident and not all(self._scan(i) for i in key):
                return None
            sessions: list[Session] = []
            for index in key:
                node = self.nodes[index]

                def start(node: Node = node) -> None:
                    session = Session(node.open(), node.name, replicator=node.hub())
                    session.outbox[:0] = session.start()
                    sessions.append(session)

                if not self.guarded(index, start):
                    for started in sessions:
                        started.close()
                    return None
            link = self.links[key] = Link((sessions[0], sessions[1]))
            self._collect()
        return link

    def disconnect(self, a: int, b: int, dead: int | None = None) -> None:
        """Drop a link: what was in flight is lost; each side hands its requests on
        (but a ``dead`` node's process, killed, does nothing more)."""
        key = (min(a, b), max(a, b))
        link = self.links.pop(key, None)
        if link is None:
            return
        with self.acting():
            for index, session in zip(key, link.sessions, strict=True):
                session.take_outbox()
                if index != dead:
                    self.guarded(index, session.close)
            self._collect()

    def _collect(self) -> None:
        """Move every session's outbox onto its link, one frame per message."""
        for key, link in self.links.items():
            for index, session in enumerate(link.sessions):
                hostile = self.hostile if self.is_hostile(key[index]) else None
                for message in session.take_outbox():
                    if hostile is not None and hostile.withholds(message):
                        continue
                    frame = (hostile.forge(message) if hostile else message).encode()
                    self.traffic.bytes += len(frame)
                    link.queues[1 - index].append(frame)

    def deliver(self, a: int, b: int, count: int) -> int:
        """Deliver up to ``count`` messages on the link a-b, the seed choosing the
        direction of each; return how many were delivered."""
        key = (min(a, b), max(a, b))
        with self.acting():
            delivered = self._deliver(key, count)
            self.scan_stale()
            return delivered

    def scan_stale(self) -> bool:
        """Resident nodes scan what a read for a peer found changed since it was
        recorded (``backer run`` does at once: a file written with no event its watcher
        heard), and a node whose own lost events came back scans everything
        (``Share.rescan_due``: ``backer run`` at once, ``backer sync`` once its sessions
        end); whether any did."""
        stale = [i for i, n in enumerate(self.nodes) if self.resident and n.stale and not n.down]
        for index in stale:
            self._scan(index, whole=False, off_loop=True)
            self._collect()
        due = [
            i
            for i, n in enumerate(self.nodes)
            if n.share is not None and n.share.rescan_due and not n.down
            and (self.resident or not self.linked(i))
        ]  # fmt: skip
        for index in due:
            self._scan(index, off_loop=self.resident)
            self._collect()
        return bool(stale or due)

    def _deliver(self, key: tuple[int, int], count: int) -> int:
        delivered = 0
        while delivered < count and key in self.links:
            link = self.links[key]
            directions = [i for i in (0, 1) if link.queues[i]]
            if not directions:
                break
            index = self.random.choice(directions)
            frame = link.queues[index].pop(0)
            delivered += 1
            self.traffic.messages += 1
            session = link.sessions[index]
            for message in link.readers[index].feed(frame):
                if self.is_hostile(key[index]) and self.hostile.drops(message):  # type: ignore[union-attr]
                    continue
                try:
                    if not self.guarded(
                        key[index], functools.partial(self._receive, session, message)
                    ):
                        return delivered
                except ProtocolError as exc:  # honest nodes refuse only the hostile one
                    if self.hostile is None or self.hostile.index not in key:
                        receiver, sender = (self.nodes[key[i]].name for i in (index, 1 - index))
                        raise InvariantBroken(f"{receiver} refused {sender}: {exc}") from exc
                    self.hostile.refused(str(exc))
                    self.disconnect(*key)
                    return delivered
            self._collect()
        return delivered

    @staticmethod
    def _receive(session: Session, message: object) -> None:
        replies = session.receive(message)  # type: ignore[arg-type]
        session.outbox += replies  # receiving may have replaced the outbox

    def sync(self, a: int, b: int, cut_after: int | None = None) -> bool:
        """Connect (or reuse the link), deliver on it until it is quiet, then close it
        (resident nodes keep it); True if both sessions completed. With ``cut_after``,
        the link drops after that many messages, as a connection lost mid-transfer."""
        with self.acting():
            complete = self._sync(a, b, cut_after)
            self.scan_stale()  # (one-shot: the sessions ended)
            return complete

    def _sync(self, a: int, b: int, cut_after: int | None) -> bool:
        link = self.connect(a, b)
        if link is None:
            return False
        delivered, settling = 0, self.settling()
        while not link.quiet:
            delivered += self.deliver(a, b, 1)
            settling(delivered)
            if (min(a, b), max(a, b)) not in self.links:
                return False
            if cut_after is not None and delivered >= cut_after:
                self.disconnect(a, b)
                return False
        complete = all(s.complete for s in link.sessions)
        if not self.resident:  # resident nodes keep their links: only a cut drops one
            self.disconnect(a, b)
        return complete

    def _own_events(self) -> int:
        return sum(n.share.journal.length(n.share.device) for n in self.nodes if n.share)

    def settling(self) -> Callable[[int], None]:
        """A guard for a loop that delivers until links are quiet, nobody editing: what
        the nodes record meanwhile (resolutions, their copies, folders made) is bounded
        by what there is to settle, so more than LIVELOCK_EVENTS events of their own is
        nodes resolving paths into each other without end (seed 130395 made 78,000
        versions in 8 minutes); called with the messages delivered so far, it fails
        within seconds instead."""
        start = self._own_events()

        def check(delivered: int) -> None:
            if delivered % LIVELOCK_EVERY or self._own_events() - start <= LIVELOCK_EVENTS:
                return
            busiest = max(
                (n for n in self.nodes if n.share), key=lambda n: n.share.journal.position()
            )
            rows = busiest.share.catalog.conn.execute(
                "SELECT path FROM versions ORDER BY position DESC LIMIT 200"
            )
            paths = sorted({path for (path,) in rows})
            raise InvariantBroken(
                f"livelock: the nodes recorded over {LIVELOCK_EVENTS} events of their own "
                f"in {delivered} messages while their links settled, nobody editing; "
                f"{busiest.name}'s last versions are at {paths[:4]}"
            )

        return check

    def scan(self, node: int, during: int = 0) -> None:
        """A watcher firing: the node scans (resident: the paths edited since its last
        scan); with ``during``, up to that many messages move on its links (and what
        they bring is applied) while the scan hashes."""
        with self.acting():
            self._scan(node, during, whole=not self.resident, off_loop=self.resident)
            self._collect()

    def _scan(
        self, index: int, during: int = 0, whole: bool = True, off_loop: bool = False
    ) -> bool:
        node = self.nodes[index]
        if node.down:
            return False

        def meanwhile() -> None:
            self._collect()
            self._deliver_around(index, during)
            if node.share is None:  # its process ended (a disk error while applying)
                raise Crashed

        mid_walk = during % 2 == 1  # odd: the world moves before the first file is hashed
        scan = functools.partial(
            node.scan, meanwhile if during else None, whole, off_loop, mid_walk
        )
        try:
            completed = self.guarded(index, scan)
        except Crashed:
            completed = False
        if not completed:  # its process ended after the scan: what the scan left is for
            node.stray_after_scan = []  # the next process's first scan, a whole one
            return False
        if self.disks.active(node.root):  # it may not have listed every directory
            node.stray_after_scan = []
            node.edit(None)
        return True

    def _deliver_around(
        self, index: int, count: int, until: Callable[[], bool] | None = None
    ) -> int:
        """Deliver up to ``count`` messages on the links of node ``index``, the seed
        choosing the link of each, stopping early once ``until()`` holds."""
        delivered = 0
        while delivered < count and not (until and until()):
            busy = sorted(k for k, link in self.links.items() if index in k and not link.quiet)
            if not busy:
                break
            delivered += self._deliver(self.random.choice(busy), 1)
        return delivered

    def deliver_around(self, index: int, count: int) -> int:
        """Deliver up to ``count`` messages on node ``index``'s links (a step of its own)."""
        with self.acting():
            return self._deliver_around(index, count)

    def linked(self, index: int) -> list[int]:
        """The nodes node ``index`` has an open link with."""
        return sorted(b if a == index else a for a, b in self.links if index in (a, b))

    def applying(self, index: int, limit: int, window: bool = False) -> list[str]:
        """Deliver on node ``index``'s links (at most ``limit`` messages) until it is
        applying a plan (with ``window``: until a window of it started, its free space
        checked); return the files and links that plan is about to write."""
        node = self.nodes[index]

        def planned() -> list[str]:
            replicator = node.replicator if node.share is not None else None
            if replicator is None or replicator.operations is None:
                return []
            if replicator.assembly is not None:
                return sorted(replicator.assembly.staged)
            # (the plan holds what no window has taken yet)
            return [] if window else [o.path for o in replicator.operations if o.version.size]

        with self.acting():
            self._deliver_around(index, limit, lambda: bool(planned()))
        return sorted(planned())

    def stop(self, index: int) -> None:
        """``backer run`` stopped: links closed, the transfer in progress given up (its
        temps removed), the share closed, process state discarded."""
        node = self.nodes[index]
        with self.acting():
            for a, b in [k for k in self.links if index in k]:
                self.disconnect(a, b)
            share, ours = node.share, set[Path]()
            if share is not None and node.replicator is not None:
                ours = {share.root / t for t in share.temps_in_use} | share.resumable_temps
                faults = sum(self.disks.injected.values())
                if not self.guarded(index, node.replicator.abandon):
                    ours = set()  # its disk failed it: the process ended there
                if sum(self.disks.injected.values()) != faults:  # a temp whose removal
                    ours = set()  # failed stays for the next scan's sweep (seed 11177)
            node.stop()
        left = sorted(p for p in ours if os.path.lexists(p))
        if left:
            raise InvariantBroken(f"{node.name} stopped and left its temp files {left}")

    def start(self, index: int) -> None:
        """``backer run`` started again: it opens the share from disk, scans everything,
        and dials every peer that runs."""
        node = self.nodes[index]
        if not node.down:
            return
        node.down = False
        with self.acting():
            if not self._scan(index):
                return
            for other in range(len(self.nodes)):
                self.connect(index, other)

    def prune(self, index: int, everything: bool = False) -> PruneReport | None:
        """The node drops the kept contents its retention policy no longer keeps, as
        ``backer prune`` and the node's hourly prune do (the same engine function: in
        one transaction, then the contents it no longer holds announced in UNHELD
        events, pushed to its links); with ``everything``, every one no file holds, as
        ``backer prune --all`` does. None if it is not running or its disk failed it."""
        node = self.nodes[index]
        if node.down:
            return None
        reports: list[PruneReport] = []

        def prune() -> None:
            share = node.open()
            before = _pruned(share) if everything else set()
            policy = DROP_ALL if everything else None
            try:
                reports.append(prune_share(share, entropy.now_ms(), policy=policy))
            finally:  # (committed before a failing disk ended the process, maybe)
                if everything and self.learned is not None:  # (may drop inside the window)
                    dropped = _pruned(share) - before
                    self.learned.dropped_by_all.setdefault(node.name, set()).update(dropped)

        with self.acting():
            self.guarded(index, prune)
            if reports and reports[0].announced and node.share is not None:
                self._push(index, advance=False)  # its UNHELD events go to its links
                self._collect()
        return reports[0] if reports else None

    def revise(self, index: int, request: dict[str, Any]) -> str | None:
        """A person's ``backer restore`` or ``backer resolve`` (``request`` as the CLI
        sends it to the node) run as the node runs it (``commands.node_revise``): the
        node scans first, bytes it lacks come from its open links, what it records goes
        to them. Returns the line it says (``refused: …`` for a one-line refusal), or
        None if it is not running or its process ended."""
        node = self.nodes[index]
        if node.down:
            return None
        said: list[str] = []

        def revise() -> None:
            share = node.open()
            try:
                if request["op"] == "resolve":
                    keep, both = request.get("keep"), bool(request.get("keep_both"))
                    said.append(revisions.resolve_conflict(share, request["path"], keep, both))
                    return
                plan, outside, fetched = commands.restore_plan(share, request)
                if fetched is not None:
                    try:
                        self._fetch(index, fetched)
                    except BaseException:
                        fetched.close()
                        raise
                said.append(commands.finish_restore(share, plan, outside, fetched))
            except BackerError as refusal:
                said.append(f"refused: {refusal}")

        with self.acting():
            if not self._scan(index, whole=not self.resident) or not self.guarded(index, revise):
                return None
            if node.share is not None:
                self._push(index)
            self._collect()
        return said[0] if said else None

    def _push(self, index: int, advance: bool = True) -> None:
        """Node ``index``'s links take what its journal grew by (``advance``: and its
        plan goes on), as backer's own step there (a kill may end it)."""
        hub = self.nodes[index].hub()

        def push() -> None:
            hub.journal_grew()
            if advance:
                hub.advance()

        self.guarded(index, push)

    def _fetch(self, index: int, fetched: revisions.Fetched, limit: int = 400) -> None:
        """Ask node ``index``'s caught-up peers for what ``fetched`` wants, delivering on
        its links (at most ``limit`` messages) until it has it all or every peer lacked
        some of it (``commands._fetch``, with messages for its deadline)."""
        replicator = self.nodes[index].hub()
        if not any(s.peer_caught_up for s in replicator.sessions):
            return
        replicator.retrieve(fetched)
        self._collect()
        self._deliver_around(index, limit, lambda: fetched.settled)
        if fetched in replicator.sinks:
            replicator.sinks.remove(fetched)

    def backup(self, node: int) -> None:
        """Copy the node's ``.backer/`` as it is on disk now (a crash-consistent copy)."""
        source = self.nodes[node].root / ".backer"
        target = self.base / f"backup{node}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, symlinks=True, ignore=shutil.ignore_patterns("lock"))

    def restore(self, node: int) -> bool:
        """The node crashes and comes back with its last backup of ``.backer/`` (its files
        and its home stay as they are); False if it has no backup."""
        backup = self.base / f"backup{node}"
        if not backup.exists() or self.nodes[node].down:
            return False
        self.crash(node)
        metadata = self.nodes[node].root / ".backer"
        shutil.rmtree(metadata)
        shutil.copytree(backup, metadata, symlinks=True)
        self.rolled_back = True
        self.note_learned()  # (what it learned since the backup, it learns again)
        return True

    def crash(self, node: int, killed: bool = False) -> None:
        for a, b in [k for k in self.links if node in k]:
            self.disconnect(a, b, dead=node if killed else None)
        self.nodes[node].crash(killed)

    def craft(self, kind: str, pick: int) -> None:
        """The hostile node's modified client records a crafted change (see
        :mod:`.hostile`) and pushes it to its open links, as it pushes a scan's."""
        hostile = self.hostile
        if hostile is None or hostile.index < 0 or self.nodes[hostile.index].down:
            return
        node = self.nodes[hostile.index]
        others = [bytes(n.key.verify_key) for n in self.nodes if n is not node]

        def craft() -> None:
            hostile.craft(node.open(), kind, pick, others)
            node.hub().journal_grew()
            node.hub().advance()

        with self.acting():
            self.guarded(hostile.index, craft)
            node.edit(None)  # what its own scan makes of it is no honest node's concern
            self._collect()

    def expel_hostile(self) -> None:
        """Leave the honest nodes among themselves for the final checks: the hostile
        node's links close, its process ends and it leaves the list (never node 0)."""
        if self.hostile is None or self.hostile.index < 0:
            return
        for a, b in list(self.links):
            self.disconnect(a, b)
        self.nodes.pop(self.hostile.index).stop()
        self.hostile.index = -1

    def write(self, node: int, path: str, data: bytes) -> None:
        self.nodes[node].edit([path])
        target = self.nodes[node].root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.is_dir():
            return
        target.write_bytes(data)
