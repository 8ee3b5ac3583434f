"""Test helpers: devices in temp dirs and an in-memory pump between two sessions."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nacl.signing
import pytest

from backer.model.membership import EventKind
from backer.model.share import Share
from backer.protocol.session import Session
from backer.protocol.wire import PROTOCOL_VERSION, FrameReader, Hello, Message, Summary
from journal import Event


def make_devices(tmp_path: Path, count: int) -> list[Share]:
    """A founding share and ``count - 1`` empty replicas, all admitted as members."""
    keys = [nacl.signing.SigningKey.generate() for _ in range(count)]
    roots = [tmp_path / f"device{n}" for n in range(count)]
    for root in roots:
        root.mkdir()
    founder = Share.create(roots[0], keys[0])
    shares = [founder]
    for key, root in zip(keys[1:], roots[1:], strict=True):
        founder.admit(bytes(key.verify_key), root.name)
        shares.append(Share.create(root, key, joining=(founder.share_id, founder.share_key)))
    return shares


def forge(share: Share, payload: bytes, kind: EventKind = EventKind.STATE) -> Event:
    """A validly signed event of ``share``'s device carrying ``payload`` as is (a STATE
    event after the CLIENT event declaring the share's Yjs client id if its log lacks
    one, as the share itself sends it): whether a peer accepts it depends on the payload."""
    nonce = share.state.nonce
    entries = [(kind, payload)]
    declared = any(e.payload == nonce for e in share.journal.events(share.device))
    if kind == EventKind.STATE and not declared:
        entries.insert(0, (EventKind.CLIENT, nonce))
    return share.journal.append(share.key, entries)[-1]


def _wire(messages: list[Message], reader: FrameReader) -> list[Message]:
    """Encode and decode, so that every test also exercises the framing."""
    return list(reader.feed(b"".join(m.encode() for m in messages)))


def syncing(session: Session) -> Session:
    """``session`` as it is once its peer said Hello and sent an empty Summary: ready for
    Events, requests and answers (a test that sends those directly starts here)."""
    session.receive(Hello(PROTOCOL_VERSION, b"peer"))
    session.receive(Summary([], 0))
    return session


def pump(a: Session, b: Session, max_rounds: int = 10_000) -> None:
    """Start two sessions and deliver messages both ways until both go quiet."""
    exchange(a, b, a.start(), b.start(), max_rounds)


def exchange(
    a: Session, b: Session, to_b: list[Message], to_a: list[Message], max_rounds: int = 10_000
) -> None:
    """Deliver ``to_b`` and ``to_a`` and every reply until neither side says more."""
    readers = FrameReader(), FrameReader()
    for _ in range(max_rounds):
        if not to_a and not to_b:
            return
        incoming_b, to_b = _wire(to_b, readers[1]), []
        incoming_a, to_a = _wire(to_a, readers[0]), []
        for message in incoming_b:
            to_a += b.receive(message)
        for message in incoming_a:
            to_b += a.receive(message)
    raise AssertionError("sessions did not go quiet")


class Links:
    """In-memory connections between sessions, several per device if need be: messages a
    session's replicator leaves in any outbox are delivered too (relays, spread requests)."""

    def __init__(self, pairs: list[tuple[Session, Session]]) -> None:
        self.pairs = list(pairs)
        self.open = [True] * len(pairs)
        self.readers = [(FrameReader(), FrameReader()) for _ in pairs]
        for a, b in pairs:
            a.outbox[:0], b.outbox[:0] = a.start(), b.start()

    def step(self) -> bool:
        """Deliver everything in flight once, both ways on every open link; False when
        nothing was in flight."""
        moved = False
        for index, (a, b) in enumerate(self.pairs):
            if not self.open[index]:
                continue
            to_b = _wire(a.take_outbox(), self.readers[index][1])
            to_a = _wire(b.take_outbox(), self.readers[index][0])
            moved |= bool(to_a or to_b)
            for receiver, messages in ((b, to_b), (a, to_a)):
                for message in messages:
                    replies = receiver.receive(message)
                    receiver.outbox += replies
        return moved

    def run(self, max_rounds: int = 10_000) -> None:
        for _ in range(max_rounds):
            if not self.step():
                return
        raise AssertionError("sessions did not go quiet")

    def drop(self, index: int) -> None:
        """The link breaks: what was in flight is lost, both sessions are closed."""
        self.open[index] = False
        for session in self.pairs[index]:
            session.take_outbox()
            session.close()


def waiting_for_chunks(a: Share, b: Share) -> tuple[Session, Session, Links]:
    """A session from a to b stepped until b's plan has asked for chunks: b's window is
    open and waiting, the moment the person's edits race the plan."""
    left, right = Session(a, "a"), Session(b, "b")
    links = Links([(left, right)])
    for _ in range(100):
        if right.replicator.chunks_asked:
            break
        links.step()
    assert right.replicator.chunks_asked
    return left, right, links


def sync(a: Share, b: Share) -> tuple[Session, Session]:
    """Scan both, then run one session between them to completion."""
    a.scan()
    b.scan()
    left, right = Session(a, "a"), Session(b, "b")
    pump(left, right)
    assert left.complete and right.complete, (left.stats, right.stats)
    return left, right


def tree(root: Path) -> dict[str, tuple[str, bytes | str, int]]:
    """Everything under ``root`` except .backer: kind, content or target, mode bits."""
    result: dict[str, tuple[str, bytes | str, int]] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if relative == ".backer" or relative.startswith(".backer/"):
            continue
        info = path.lstat()
        if path.is_symlink():
            result[relative] = ("link", os.readlink(path), 0)
        elif path.is_dir():
            result[relative] = ("dir", b"", 0)
        else:
            result[relative] = ("file", path.read_bytes(), info.st_mode & 0o111)
    return result


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path`` (root only), unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@contextlib.contextmanager
def exfat_disk(path: Path, size_mib: int = 64) -> Iterator[Path]:
    """An exFAT filesystem (no hard links, no ``renameat2`` exchange) mounted through
    FUSE at ``path`` from an image file beside it (root, exfatprogs and exfat-fuse
    only); unmounted and detached at the end."""
    tools = ("mkfs.exfat", "mount.exfat-fuse", "losetup")
    if os.geteuid() != 0 or not all(map(shutil.which, tools)) or not Path("/dev/fuse").exists():
        pytest.skip("an exFAT mount needs root, /dev/fuse, exfatprogs and exfat-fuse")
    image = path.with_name(path.name + ".img")
    with open(image, "wb") as file:
        file.truncate(size_mib << 20)
    subprocess.run(["mkfs.exfat", str(image)], check=True, capture_output=True)
    made = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"no loop device: {made.stderr.strip()}")
    loop = made.stdout.strip()
    try:
        path.mkdir()
        mounted = subprocess.run(["mount.exfat-fuse", loop, str(path)], capture_output=True)
        if mounted.returncode != 0:  # (a container may have /dev/fuse and not the right)
            pytest.skip(f"cannot mount through FUSE here: {mounted.stderr.decode().strip()}")
        try:
            yield path
        finally:
            subprocess.run(["umount", str(path)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
        image.unlink()


def live(share: Share) -> dict[str, object]:
    """Every live version of the share, by path."""
    return {path: version for path, _, version in share.catalog.all_live()}


timing = pytest.mark.xdist_group("timing")
"""For a test that asserts how long something took: the suite runs in parallel workers
(pyproject.toml), and these run one after another on one of them, so that at least they
never race each other for the CPU."""
