"""The bulk transfer path: records and frames decoded in place, however the bytes are cut,
and a chunk that does not match its hash still refused."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from backer.model import materializer
from backer.model.share import Share
from backer.protocol.channel import ChannelError, SecureChannel
from backer.protocol.session import Session
from backer.protocol.wire import (
    Chunk,
    FrameReader,
    Hello,
    Manifests,
    Message,
    ProtocolError,
    WantChunks,
)
from backer.scanner.content import Manifest
from tests.helpers import make_devices, waiting_for_chunks
from tests.test_channel import pair, shake

MESSAGES: list[Message] = [
    Hello(3, b"a"),
    WantChunks([os.urandom(32) for _ in range(64)]),
    Chunk(os.urandom(32), os.urandom(200_000)),  # spans four records
    Chunk(os.urandom(32), b""),
    Manifests([os.urandom(32), os.urandom(32)], [os.urandom(5000), b""]),
    Chunk(os.urandom(32), os.urandom(65_519 - 41)),  # exactly one record's plaintext
]


def _established() -> tuple[SecureChannel, SecureChannel]:
    psk = os.urandom(32)
    _, _, client, server = pair(psk, psk, set())
    shake(client, server)
    return client, server


def _cut(wire: bytes, rng: random.Random) -> list[bytes]:
    """``wire`` in pieces of 1 byte to 300 KB, so that records and frames straddle reads
    at every kind of boundary (inside a length prefix, a tag, a field)."""
    pieces, at = [], 0
    while at < len(wire):
        size = rng.choice((1, 2, 3, 17, rng.randint(1, 70_000), rng.randint(1, 300_000)))
        pieces.append(wire[at : at + size])
        at += size
    return pieces


@pytest.mark.parametrize("seed", range(12))
def test_records_and_frames_cut_anywhere_decode_to_the_same_messages(seed: int) -> None:
    client, server = _established()
    rng = random.Random(seed)
    batched = seed % 2 == 0  # all messages in one send, or one send each
    if batched:
        plaintext = bytearray()
        for message in MESSAGES:
            message.encode_into(plaintext)
        client.send(plaintext)
    else:
        for message in MESSAGES:
            client.send(message.encode())
    wire = bytes(client.data_to_send())
    frames = FrameReader()
    received: list[Message] = []
    for piece in _cut(wire, rng):
        received += frames.feed(server.receive_data(piece))
    assert received == MESSAGES
    assert not frames.buffer


@pytest.mark.parametrize("seed", range(6))
def test_frames_cut_anywhere_decode_to_the_same_messages(seed: int) -> None:
    """The frame reader alone, fed pieces of 1 byte up: a length prefix, a type byte or
    a field cut between two feeds, a frame completed by the next one."""
    stream = b"".join(message.encode() for message in MESSAGES)
    frames = FrameReader()
    received: list[Message] = []
    for piece in _cut(stream, random.Random(seed)):
        received += frames.feed(piece)
    assert received == MESSAGES
    assert not frames.buffer


def test_a_message_knows_its_size_without_encoding() -> None:
    for message in MESSAGES:
        assert message.size() == len(message.encode())


@pytest.mark.parametrize("where", [3, 40_000, 65_533, 65_540, 150_000])
def test_a_tampered_record_is_refused_wherever_the_reads_cut_it(where: int) -> None:
    client, server = _established()
    client.send(os.urandom(200_000))
    wire = bytearray(client.data_to_send())
    wire[where] ^= 0x01
    with pytest.raises(ChannelError):
        for start in range(0, len(wire), 50_000):  # records straddle these reads
            server.receive_data(bytes(wire[start : start + 50_000]))


def test_a_record_shorter_than_its_tag_is_refused() -> None:
    _, server = _established()
    with pytest.raises(ChannelError, match="shorter than its authentication tag"):
        server.receive_data(b"\x00\x05hello")


def test_a_chunk_that_does_not_match_its_hash_is_refused_and_never_written(
    tmp_path: Path,
) -> None:
    a, b = make_devices(tmp_path, 2)
    data = os.urandom(300_000)
    (a.root / "big.bin").write_bytes(data)
    a.scan()
    _, right, _ = waiting_for_chunks(a, b)
    asked = next(iter(right.replicator.chunks_asked))
    length = right.replicator.chunk_lengths[asked]
    client, server = _established()
    client.send(Chunk(asked, os.urandom(length)).encode())
    frames = FrameReader()
    with pytest.raises(ProtocolError, match="does not match its hash"):
        for message in frames.feed(server.receive_data(client.data_to_send())):
            right.receive(message)
    assert not (b.root / "big.bin").exists()


def _fetch(tmp_path: Path, data: dict[str, bytes]) -> tuple[Share, Session]:
    """``data`` written on a, fetched by b through a session pair; b's session."""
    a, b = make_devices(tmp_path, 2)
    for name, content in data.items():
        (a.root / name).write_bytes(content)
    a.scan()
    _, right, links = waiting_for_chunks(a, b)
    links.run()
    return b, right


def test_a_large_file_is_checked_and_flushed_off_the_loop_once_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large file is verified and flushed in the worker thread as soon as its last
    chunk is written, not on the event loop at the commit; a small one at the commit."""
    monkeypatch.setattr(materializer, "CHECK_EARLY", 200_000)
    calls: list[tuple[int, str]] = []
    check = materializer._check_and_flush

    def spy(temp: Path, manifest: Manifest, checked: frozenset[int]) -> None:
        calls.append((manifest.size, threading.current_thread().name))
        check(temp, manifest, checked)

    monkeypatch.setattr(materializer, "_check_and_flush", spy)
    big, later, small = os.urandom(600_000), os.urandom(600_000), os.urandom(100_000)
    b, right = _fetch(tmp_path, {"big.bin": big, "later.bin": later, "small.bin": small})
    assert (b.root / "big.bin").read_bytes() == big
    assert (b.root / "later.bin").read_bytes() == later
    assert (b.root / "small.bin").read_bytes() == small
    assert [size for size, _ in calls] == [600_000, 600_000]  # not the small file
    assert all(thread.startswith("backer-check") for _, thread in calls)
    assert not right.replicator.reports[-1].errors


@pytest.mark.parametrize("early", [True, False])
def test_a_write_that_mangled_a_fetched_chunk_never_becomes_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, early: bool
) -> None:
    """Bytes a write lost or mangled are caught by the re-read of the complete file,
    whether that check runs early (a large file) or at the commit."""
    monkeypatch.setattr(materializer, "CHECK_EARLY", 200_000 if early else 1 << 40)
    write = materializer.write_all

    def mangling(fd: int, data: bytes | memoryview, offset: int) -> None:
        damaged = bytearray(data)
        damaged[len(damaged) // 2] ^= 0xFF
        write(fd, damaged if offset == 0 else data, offset)

    monkeypatch.setattr(materializer, "write_all", mangling)
    b, right = _fetch(tmp_path, {"big.bin": os.urandom(600_000)})
    assert not (b.root / "big.bin").exists()
    errors = [str(e) for r in right.replicator.reports for e in r.errors]
    assert any("do not match" in e for e in errors), errors
    assert not [p for p in b.root.iterdir() if p.name.startswith("big.bin")]
