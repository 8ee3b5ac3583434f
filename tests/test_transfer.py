"""The bulk transfer path: records and frames decoded in place, however the bytes are cut,
and a chunk that does not match its hash still refused."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from backer.protocol.channel import ChannelError, SecureChannel
from backer.protocol.wire import (
    Chunk,
    FrameReader,
    Hello,
    Manifests,
    Message,
    ProtocolError,
    WantChunks,
)
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

