"""A cluster of real backer nodes in one process, connected by in-memory sessions.

Each node is a real share (journal, state, scanner, materializer) in its own temp
directory. Connections are pairs of sans-IO sessions whose messages go through the
real framing; delivery is driven by a seeded scheduler, so one seed replays one trace.
A connection can be cut after any number of messages (a dropped link mid-transfer),
and a node can crash (its in-memory state is dropped; disk and journal stay).
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import nacl.signing

from backer.session import Session
from backer.share import Share
from backer.wire import FrameReader, Message, ProtocolError


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
    share: Share | None = None
    crashes: int = 0

    def open(self) -> Share:
        if self.share is None:
            self.share = Share(self.root, self.key)
        return self.share

    def crash(self) -> None:
        """Lose everything in memory (no snapshot saved, no clean close)."""
        if self.share is not None:
            self.share.db.conn.close()
            if self.share._lock is not None:
                self.share._lock.close()
            self.share = None
            self.crashes += 1


@dataclass
class Cluster:
    base: Path
    seed: int
    size: int
    nodes: list[Node] = field(default_factory=list)
    traffic: Traffic = field(default_factory=Traffic)
    refused: int = 0
    conflicts: int = 0

    def __post_init__(self) -> None:
        self.random = random.Random(self.seed)
        keys = [nacl.signing.SigningKey(self.random.randbytes(32)) for _ in range(self.size)]
        for index, key in enumerate(keys):
            root = self.base / f"node{index}"
            root.mkdir(parents=True)
            self.nodes.append(Node(f"node{index}", key, root))
        founder = Share.create(self.nodes[0].root, keys[0])
        self.nodes[0].share = founder
        for node in self.nodes[1:]:
            founder.admit(bytes(node.key.verify_key), node.name)
            joined = (founder.share_id, founder.share_key)
            node.share = Share.create(node.root, node.key, joining=joined)

    def close(self) -> None:
        for node in self.nodes:
            if node.share is not None:
                node.share.close()
                node.share = None
        shutil.rmtree(self.base, ignore_errors=True)

    def sync(self, a: int, b: int, cut_after: int | None = None) -> bool:
        """Scan both nodes, run a session between them; True if it completed.

        With ``cut_after``, the link drops after that many messages (both sessions are
        discarded, as on a broken connection)."""
        left_share, right_share = self.nodes[a].open(), self.nodes[b].open()
        left_share.scan()
        right_share.scan()
        left = Session(left_share, self.nodes[a].name)
        right = Session(right_share, self.nodes[b].name)
        try:
            return self._exchange(left, right, cut_after)
        finally:
            for session in (left, right):
                self.conflicts += session.replicator.stats.conflicts_resolved

    def _exchange(self, left: Session, right: Session, cut_after: int | None) -> bool:
        """Deliver both sessions' messages until they go quiet (or the link is cut)."""
        to_right, to_left = left.start(), right.start()
        readers = FrameReader(), FrameReader()
        delivered = 0
        while to_left or to_right:
            # deterministic interleaving: which direction goes first is the seed's choice
            directions = [(to_right, right, readers[1], "r"), (to_left, left, readers[0], "l")]
            self.random.shuffle(directions)
            new_left: list[Message] = []
            new_right: list[Message] = []
            for queue, session, reader, side in directions:
                if not queue:
                    continue
                data = b"".join(m.encode() for m in queue)
                self.traffic.bytes += len(data)
                for message in reader.feed(data):
                    delivered += 1
                    self.traffic.messages += 1
                    try:
                        replies = session.receive(message)
                    except ProtocolError:
                        self.refused += 1
                        return False  # the session closes, as it would on a real link
                    (new_left if side == "r" else new_right).extend(replies)
                    if cut_after is not None and delivered >= cut_after:
                        return False
                queue.clear()
            to_left, to_right = new_left, new_right
        return left.complete and right.complete

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
