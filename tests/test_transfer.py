"""The bulk transfer path: records and frames decoded in place, however the bytes are cut,
and a chunk that does not match its hash still refused."""

from __future__ import annotations

import asyncio
import os
import random
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest

from backer.connections import transport
from backer.model import materializer, replicator
from backer.model.share import Share
from backer.protocol.channel import ChannelError, SecureChannel
from backer.protocol.session import Session
from backer.protocol.wire import (
    APART_FROM,
    CHUNKS_BYTES,
    Chunks,
    Encoder,
    FrameReader,
    Hello,
    Manifests,
    Message,
    ProtocolError,
    WantChunks,
)
from backer.scanner import chunks
from backer.scanner.chunks import ChunkStore
from backer.scanner.content import MAX_CHUNK, ChunkRef, Manifest, manifest_of_bytes
from tests.helpers import make_devices, waiting_for_chunks
from tests.test_channel import pair, shake

MIB = 1024 * 1024
GROWN_BUFFERS = 2 + 2 * (transport.READ_SIZE // transport.FIRST_READ).bit_length()  # a read's
# buffers: two, each replaced by one twice its size while reads fill them
MESSAGES: list[Message] = [
    Hello(3, b"a"),
    WantChunks([os.urandom(32) for _ in range(64)]),
    Chunks([os.urandom(32)], [os.urandom(200_000)]),  # spans four records
    Chunks([os.urandom(32), os.urandom(32)], [b"", os.urandom(70_000)]),
    Manifests([os.urandom(32), os.urandom(32)], [os.urandom(5000), b""]),
    Chunks([os.urandom(32)], [os.urandom(65_519 - 49)]),  # exactly one record's plaintext
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
        client.send(*Encoder().encode(MESSAGES))
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
    client.send(Chunks([asked], [os.urandom(length)]).encode())
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

    def spy(temp: Path, manifest: Manifest, checked: frozenset[int], copy: Future) -> bool:
        calls.append((manifest.size, threading.current_thread().name))
        return check(temp, manifest, checked, copy)

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


def test_the_receiver_asks_for_chunks_a_request_at_a_time_not_one_per_arriving_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once its window is full, the receiver asks again only when a whole request's
    worth of it has arrived, not for one more chunk as each one arrives; the window
    still bounds what is in flight."""
    monkeypatch.setattr(replicator, "MAX_BYTES_IN_FLIGHT", 2 * MIB)
    monkeypatch.setattr(replicator, "REFILL_BYTES", MIB // 2)
    requests: list[int] = []
    in_flight: list[int] = []
    asked = Session._on_wantchunks

    def counting(session: Session, message: WantChunks) -> list[Message]:
        requests.append(len(message.hashes))
        return asked(session, message)

    monkeypatch.setattr(Session, "_on_wantchunks", counting)
    note = replicator.Replicator._ask

    def noting(self: replicator.Replicator, session: Session, *args: object) -> None:
        note(self, session, *args)  # type: ignore[arg-type]
        in_flight.append(session.bytes_in_flight)

    monkeypatch.setattr(replicator.Replicator, "_ask", noting)
    data = os.urandom(8 * MIB)
    b, right = _fetch(tmp_path, {"big.bin": data})
    assert (b.root / "big.bin").read_bytes() == data
    chunks = sum(requests)
    assert chunks == right.stats.chunks_fetched > 64
    assert len(requests) <= chunks // 4, requests  # one per arriving chunk: ~3/4 of them
    assert max(in_flight) <= 2 * MIB + MAX_CHUNK


def test_the_sender_answers_a_request_with_several_chunks_a_message_in_the_order_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request's chunks go back several to a ``Chunks`` message, up to CHUNKS_BYTES of
    them, in the order asked: not a frame, a message and a dispatch per chunk on each
    side. The receiver takes every chunk of each message in."""
    sent: list[Chunks] = []
    chunks_of = Session._chunks

    def noting(session: Session) -> Chunks:
        message = chunks_of(session)
        sent.append(message)
        return message

    monkeypatch.setattr(Session, "_chunks", noting)
    data = os.urandom(8 * MIB)
    b, right = _fetch(tmp_path, {"big.bin": data})
    assert (b.root / "big.bin").read_bytes() == data
    hashes = [h for message in sent for h in message.hashes]
    assert [ref.hash for ref in manifest_of_bytes(data).chunks] == hashes
    assert right.stats.chunks_fetched == len(hashes)
    assert len(sent) <= len(hashes) // 4, [len(message.hashes) for message in sent]
    for message in sent:
        size = sum(map(len, message.data))
        assert len(message.hashes) == 1 or size <= CHUNKS_BYTES


def _indexed(tmp_path: Path, files: dict[str, bytes]) -> tuple[Share, ChunkStore, list[ChunkRef]]:
    """A share holding ``files``, scanned; its chunk store and the first file's chunks."""
    (share,) = make_devices(tmp_path, 1)
    for name, content in files.items():
        (share.root / name).write_bytes(content)
    share.scan()
    manifest = manifest_of_bytes(next(iter(files.values())))
    return share, ChunkStore(share.root, share.catalog), manifest.chunks


def test_the_sender_reads_a_requests_chunks_with_one_query_and_one_read_per_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer's request for a file's chunks is served with one index query for all of
    them and one read per run of chunks that lie back to back: not a query, an open, a
    read and a close per chunk."""
    data = os.urandom(3 * MIB)
    share, store, refs = _indexed(tmp_path, {"big.bin": data})
    assert 16 < len(refs) <= 64
    reads: list[int] = []
    pread, preadv = os.pread, os.preadv

    def counting(fd: int, length: int, offset: int) -> bytes:
        reads.append(offset)
        return pread(fd, length, offset)

    def counting_into(fd: int, buffers: list[memoryview], offset: int) -> int:
        reads.append(offset)
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(chunks.os, "pread", counting)
    monkeypatch.setattr(chunks.os, "preadv", counting_into)
    monkeypatch.setattr(
        share.catalog, "chunk_locations", lambda _: pytest.fail("a query per chunk")
    )
    found = store.read_many([ref.hash for ref in refs])
    assert {ref.hash: bytes(found[ref.hash]) for ref in refs} == {
        ref.hash: data[ref.offset : ref.offset + ref.length] for ref in refs
    }
    assert reads == [0]


def test_the_senders_read_buffers_are_reused_only_once_the_chunks_read_into_them_are_gone(
    tmp_path: Path,
) -> None:
    """A request's runs are read into reused buffers (a new one per run cost its page
    faults), never into one whose chunks are still held (read ahead, or waiting to be
    encrypted): those keep their bytes while later requests are read."""
    data = os.urandom(12 * MIB)
    _, store, refs = _indexed(tmp_path, {"big.bin": data})
    first = refs[: len(refs) // 2]
    held = store.read_many([ref.hash for ref in first])
    owners = {id(view.obj) for view in held.values()}
    for _ in range(3):  # more requests while the first one's chunks are held
        later = store.read_many([ref.hash for ref in refs[len(refs) // 2 :]])
        assert owners.isdisjoint(id(view.obj) for view in later.values())
        del later
    assert {ref.hash: bytes(held[ref.hash]) for ref in first} == {
        ref.hash: data[ref.offset : ref.offset + ref.length] for ref in first
    }
    buffer = next(iter(held.values())).obj
    del held
    again = store.read_many([ref.hash for ref in first])
    assert any(view.obj is buffer for view in again.values())


def test_a_chunk_changed_on_disk_since_indexed_is_read_from_another_file_or_not_at_all(
    tmp_path: Path,
) -> None:
    """The sender never answers with bytes that do not match the hash asked for: a
    chunk overwritten since the scan is taken from another file that holds it, and a
    chunk no file holds any longer is missing from the answer (sent as empty). The file
    found changed is named to ``on_stale`` (a running node scans it: written with no
    event its watcher hears of, it would be seen at the hourly scan)."""
    data = os.urandom(2 * MIB)
    share, store, refs = _indexed(tmp_path, {"a.bin": data, "b.bin": data[: MIB // 2]})
    stale: list[str] = []
    store.on_stale = stale.append
    early = refs[0]  # b.bin holds it too
    late = next(ref for ref in refs if ref.offset > MIB)  # only a.bin held it
    with open(share.root / "a.bin", "r+b") as handle:
        for ref in (early, late):
            handle.seek(ref.offset)
            handle.write(bytes([data[ref.offset] ^ 0xFF]))
    found = store.read_many([ref.hash for ref in refs])
    assert late.hash not in found
    assert {h: bytes(v) for h, v in found.items()} == {
        ref.hash: data[ref.offset : ref.offset + ref.length] for ref in refs if ref != late
    }
    assert set(stale) == {"a.bin"}


def test_a_sent_chunk_is_encrypted_from_its_read_buffer_not_copied_into_the_plaintext() -> None:
    """The framing goes into the encoder's buffer; a chunk's bytes (from ``APART_FROM``)
    are a piece of their own, the very buffer they were read into, which the channel
    encrypts in place of a copy. A small chunk is copied with its framing."""
    read = bytearray(os.urandom(200_000))
    messages: list[Message] = [
        Chunks(
            [os.urandom(32), os.urandom(32), os.urandom(32)],
            [memoryview(read)[10:90_000], os.urandom(APART_FROM - 1), memoryview(read)[90_000:]],
        ),
        WantChunks([os.urandom(32)]),
    ]
    encoder = Encoder()
    pieces = encoder.encode(messages)
    assert [piece.obj is read for piece in pieces] == [False, True, False, True, False]
    assert all(pieces[at].obj is encoder.buffer for at in (0, 2, 4))
    assert b"".join(pieces) == b"".join(message.encode() for message in messages)


def test_a_received_chunk_is_a_view_of_the_decrypted_read_not_a_copy() -> None:
    """A chunk's bytes are decoded in place: the data is a view of the buffer the
    channel decrypted into, whatever else shares the read."""
    client, server = _established()
    sent = [
        Chunks([os.urandom(32), os.urandom(32)], [os.urandom(70_000), os.urandom(100)]),
        WantChunks([os.urandom(32)]),
    ]
    client.send(*Encoder().encode(sent))
    buffer = server.receive_data(client.data_to_send())
    received = list(FrameReader().feed(buffer))
    assert received == sent
    data = received[0].data  # type: ignore[attr-defined]
    assert isinstance(buffer, memoryview)
    assert all(isinstance(view, memoryview) and view.obj is buffer.obj for view in data)


def test_a_dialled_connection_receives_into_two_reused_buffers_not_a_copy_per_read() -> None:
    """A dialled connection's bytes land straight in two buffers used in turn (a read's
    view stays valid until the next read), arrive whole and in order however the peer
    cuts its writes, and the end reads as b""."""
    sent = os.urandom(5 * MIB + 12_345)
    rng = random.Random(1)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        at = 0
        while at < len(sent):
            size = rng.choice((1, 100, 70_000, 2 * MIB))
            writer.write(sent[at : at + size])
            at += size
            await writer.drain()
        writer.close()

    async def fetch() -> tuple[bytes, set[int]]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        streams = await transport.tcp_streams("127.0.0.1", port)
        got, buffers = bytearray(), set()
        for _ in range(100_000):
            data = await streams.reader.read(transport.READ_SIZE)
            if not data:
                break
            assert isinstance(data, memoryview)
            buffers.add(id(data.obj))
            got += data
        streams.close()
        server.close()
        return bytes(got), buffers

    got, buffers = asyncio.run(fetch())
    assert got == sent
    assert len(buffers) <= GROWN_BUFFERS


class _Flooding(asyncio.Transport):
    """A transport whose peer always has more to send (pausing changes nothing)."""

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def test_a_flooded_connection_keeps_its_two_grown_buffers() -> None:
    """Each read that fills its buffer grows the other one, and never replaces it with
    one of the same size: once one buffer was 4 MiB and the other 2 MiB, every read that
    filled the small one replaced the large one with a new zeroed 4 MiB, and the small
    one never grew (140 new buffers per GiB received)."""

    async def flood() -> list[object]:
        received = transport.Received()
        received.connection_made(_Flooding())
        read: list[object] = []  # every buffer read, kept: ids are not reused
        for _ in range(60):
            received.buffer_updated(len(received.get_buffer(-1)))  # filled
            data = await received.read()
            assert isinstance(data, memoryview)
            read.append(data.obj)
        return read

    read = asyncio.run(flood())
    assert len({id(buffer) for buffer in read}) <= GROWN_BUFFERS
    assert {len(buffer) for buffer in read[-2:]} == {transport.READ_SIZE}  # type: ignore[arg-type]


def test_an_accepted_connection_receives_into_two_reused_buffers_after_its_header() -> None:
    """A node's accepted connections went through ``StreamReader`` (a copy into its
    buffer and out again); they now receive as dialled ones do. The clear header is
    taken exactly (whatever came with it is read next), an end before it is an
    ``IncompleteReadError``."""
    sent = os.urandom(3 * MIB + 777)
    header = os.urandom(17)
    results: list[tuple[bytes, bytes, set[int]]] = []
    short: list[BaseException] = []

    async def receive(reader: transport.Received, writer: asyncio.StreamWriter) -> None:
        try:
            first = await reader.readexactly(len(header))
        except asyncio.IncompleteReadError as exc:
            short.append(exc)
            writer.close()
            return
        got, buffers = bytearray(), set()
        for _ in range(100_000):
            data = await reader.read(transport.READ_SIZE)
            if not data:
                break
            assert isinstance(data, memoryview)
            buffers.add(id(data.obj))
            got += data
        results.append((first, bytes(got), buffers))
        writer.close()

    async def run() -> None:
        tasks: set[asyncio.Task[None]] = set()

        def accepted(reader: transport.Received, writer: asyncio.StreamWriter) -> None:
            tasks.add(asyncio.ensure_future(receive(reader, writer)))

        server = await transport.tcp_server(accepted, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(header + sent[:1000])  # the header and more in one segment
        writer.write(sent[1000:])
        await writer.drain()
        writer.close()
        _, cut = await asyncio.open_connection("127.0.0.1", port)
        cut.write(header[:5])
        await cut.drain()
        cut.close()
        for _ in range(500):
            if len(results) + len(short) == 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        server.close()

    asyncio.run(run())
    [(first, got, buffers)] = results
    assert first == header and got == sent
    assert len(buffers) <= GROWN_BUFFERS
    assert isinstance(short[0], asyncio.IncompleteReadError) and short[0].partial == header[:5]
