"""A cluster of real backer nodes in one process, connected by in-memory sessions.

Each node is a real share (journal, state, scanner, materializer) in its own temp
directory, with one :class:`~backer.replicator.Replicator` shared by all of its open
connections, as in ``backer serve``. A link is a pair of sans-IO sessions whose
messages go through the real framing into two FIFO queues (a stream is ordered); the
seeded scheduler decides which link and which direction delivers next, so deliveries
across links are delayed and reordered, and files can change while a link is half way.
A link can be cut at any message; a node can crash (its in-memory state, sessions
included, is dropped; disk and journal stay).
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import nacl.signing

from backer.replicator import Replicator
from backer.session import Session
from backer.share import Share
from backer.wire import FrameReader, ProtocolError


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

    def open(self) -> Share:
        if self.share is None:
            self.share = Share(self.root, self.key, home=self.home)
        return self.share

    def hub(self) -> Replicator:
        """The replicator all of this node's open links share."""
        if self.replicator is None:
            self.replicator = Replicator(self.open())
        return self.replicator

    def scan(self) -> None:
        """What a file watcher would trigger: scan, and relay to the open links."""
        summary = self.open().scan()
        self.stray_after_scan = self.stray_temp_files()
        if summary.events:
            self.hub().journal_grew()
            self.hub().advance()

    def crash(self) -> None:
        """Lose everything in memory (no snapshot saved, no clean close)."""
        if self.replicator is not None:
            self.conflicts += self.replicator.stats.conflicts_resolved
            self.replicator = None
        if self.share is not None:
            self.share.db.conn.close()
            if self.share._lock is not None:
                self.share._lock.close()
            self.share = None
            self.crashes += 1

    def stray_temp_files(self) -> list[Path]:
        """Temp files that no assembly in progress is using (a crash's, or one whose
        directory the person renamed mid-transfer): the next scan must sweep them."""
        in_use = self.share.temps_in_use if self.share is not None else set()
        return [p for p in self.root.rglob("*.backer-tmp") if p not in in_use]


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
    refused: int = 0
    links: dict[tuple[int, int], Link] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.random = random.Random(self.seed)
        keys = [nacl.signing.SigningKey(self.random.randbytes(32)) for _ in range(self.size)]
        for index, key in enumerate(keys):
            root = self.base / f"node{index}"
            root.mkdir(parents=True)
            self.nodes.append(Node(f"node{index}", key, root, self.base / f"home{index}"))
        founder = Share.create(self.nodes[0].root, keys[0], home=self.nodes[0].home)
        self.nodes[0].share = founder
        for node in self.nodes[1:]:
            founder.admit(bytes(node.key.verify_key), node.name)
            joined = (founder.share_id, founder.share_key)
            node.share = Share.create(node.root, node.key, joining=joined, home=node.home)

    def close(self) -> None:
        self.links.clear()
        for node in self.nodes:
            if node.share is not None:
                node.share.close()
                node.share = None
        shutil.rmtree(self.base, ignore_errors=True)

    @property
    def conflicts(self) -> int:
        return sum(
            n.conflicts + (n.replicator.stats.conflicts_resolved if n.replicator else 0)
            for n in self.nodes
        )

    # -- links ------------------------------------------------------------------------------

    def connect(self, a: int, b: int) -> Link | None:
        """Open a link (if none is open): both nodes scan, then their sessions start."""
        if a == b:
            return None
        key = (min(a, b), max(a, b))
        if key in self.links:
            return self.links[key]
        ends = self.nodes[key[0]], self.nodes[key[1]]
        for node in ends:
            node.scan()
        sessions = tuple(Session(n.open(), n.name, replicator=n.hub()) for n in ends)
        for session in sessions:
            session.outbox[:0] = session.start()
        link = self.links[key] = Link(sessions)  # type: ignore[arg-type]
        self._collect()
        return link

    def disconnect(self, a: int, b: int) -> None:
        """Drop a link: what was in flight is lost; each side hands its requests on."""
        link = self.links.pop((min(a, b), max(a, b)), None)
        if link is None:
            return
        for session in link.sessions:
            session.take_outbox()
            session.close()
        self._collect()

    def _collect(self) -> None:
        """Move every session's outbox onto its link, one frame per message."""
        for link in self.links.values():
            for index, session in enumerate(link.sessions):
                for message in session.take_outbox():
                    frame = message.encode()
                    self.traffic.bytes += len(frame)
                    link.queues[1 - index].append(frame)

    def deliver(self, a: int, b: int, count: int) -> int:
        """Deliver up to ``count`` messages on the link a-b, the seed choosing the
        direction of each; return how many were delivered (a refused one closes it)."""
        key = (min(a, b), max(a, b))
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
                try:
                    replies = session.receive(message)
                except ProtocolError:
                    self.refused += 1
                    self.disconnect(a, b)  # the session closes, as on a real link
                    return delivered
                session.outbox += replies
            self._collect()
        return delivered

    def sync(self, a: int, b: int, cut_after: int | None = None) -> bool:
        """Connect (or reuse the link), deliver on it until it is quiet, then close it;
        True if both sessions completed. With ``cut_after``, the link drops after that
        many messages, as a connection lost mid-transfer."""
        link = self.connect(a, b)
        if link is None:
            return False
        delivered = 0
        while not link.quiet:
            delivered += self.deliver(a, b, 1)
            if (min(a, b), max(a, b)) not in self.links:
                return False
            if cut_after is not None and delivered >= cut_after:
                self.disconnect(a, b)
                return False
        complete = all(s.complete for s in link.sessions)
        self.disconnect(a, b)
        return complete

    def scan(self, node: int) -> None:
        self.nodes[node].scan()
        self._collect()

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
        if not backup.exists():
            return False
        self.crash(node)
        metadata = self.nodes[node].root / ".backer"
        shutil.rmtree(metadata)
        shutil.copytree(backup, metadata, symlinks=True)
        return True

    def crash(self, node: int) -> None:
        for a, b in [k for k in self.links if node in k]:
            self.disconnect(a, b)
        self.nodes[node].crash()

    def write(self, node: int, path: str, data: bytes) -> None:
        target = self.nodes[node].root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.is_dir():
            return
        target.write_bytes(data)


def disk_tree(root: Path) -> dict[str, tuple]:
    """What a user sees under ``root`` (outside .backer): kinds, bytes, link targets, modes."""
    result: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        relative_dir = os.path.relpath(dirpath, root)
        if relative_dir == ".":
            dirnames[:] = [d for d in dirnames if d != ".backer"]
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            relative = path.relative_to(root).as_posix()
            info = path.lstat()
            if path.is_symlink():
                result[relative] = ("link", os.readlink(path))
            elif path.is_dir():
                result[relative] = ("dir", info.st_mode & 0o777)
            else:
                result[relative] = ("file", path.read_bytes(), info.st_mode & 0o777)
    return result
