"""Session messages and their framing: ``u32 length | u8 type | body``, hard size limit.

Bodies are sequences of fixed-width integers and length-prefixed byte strings, read
with bounds checks; anything malformed or oversized raises :class:`ProtocolError`,
which closes the session with that reason. Nothing here does I/O: :class:`FrameReader`
consumes bytes and yields messages.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterator
from dataclasses import dataclass, fields

PROTOCOL_VERSION = 5  # 3: Addresses; 4: Need; 5: Chunks (several chunks a message)
MAX_FRAME = 8 * 1024 * 1024
APART_FROM = 16 * 1024  # a chunk's bytes this long are encrypted from where they lie
CHUNKS_BYTES = 1024 * 1024  # a Chunks message's data at most (beyond one chunk): ~13
# chunks a message; a frame a read cuts is copied whole, so not the frame limit
CHUNKS_PER_REQUEST = 64  # chunks a WantChunks asks at most, so a Chunks holds at most
# as many: each is a view of the frame (~184 bytes), so a list of them is bounded by
# this, not by the frame (2 million empty ones cost ~650 MiB, R58)
_LENGTH = struct.Struct(">I")


_INTEGER = struct.Struct(">Q")


def _put(out: memoryview, at: int, value: bytes | memoryview) -> int:
    """A length-prefixed byte string into ``out`` at ``at``; where it ends."""
    _LENGTH.pack_into(out, at, len(value))
    end = at + 4 + len(value)
    out[at + 4 : end] = value
    return end


class ProtocolError(Exception):
    """The peer broke the protocol; the session must close with this reason."""


class _Reader:
    """Reads one message body in place (a view of the frame buffer): only the fields
    themselves are copied out."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.data = memoryview(data)
        self.offset = 0

    def take(self, size: int) -> bytes:
        if size < 0 or self.offset + size > len(self.data):
            raise ProtocolError("message is truncated")
        chunk = bytes(self.data[self.offset : self.offset + size])
        self.offset += size
        return chunk

    def _number(self, size: int) -> int:
        if self.offset + size > len(self.data):
            raise ProtocolError("message is truncated")
        value = int.from_bytes(self.data[self.offset : self.offset + size], "big")
        self.offset += size
        return value

    def integer(self) -> int:
        return self._number(8)

    def blob(self) -> bytes:
        return self.take(self._number(4))

    def view(self) -> memoryview:
        """A length-prefixed field left in place: a view of the frame buffer, no copy."""
        size = self._number(4)
        if self.offset + size > len(self.data):
            raise ProtocolError("message is truncated")
        self.offset += size
        return self.data[self.offset - size : self.offset]

    def _count(self, most: int = MAX_FRAME // 4) -> int:
        count = self._number(4)
        if count > most:
            raise ProtocolError(f"list of {count} items: at most {most} can be sent")
        return count

    def blobs(self) -> list[bytes]:
        return [self.blob() for _ in range(self._count())]

    def views(self) -> list[memoryview]:
        return [self.view() for _ in range(self._count(CHUNKS_PER_REQUEST))]

    def finish(self) -> None:
        if self.offset != len(self.data):
            raise ProtocolError("message has trailing bytes")


_INT, _BYTES, _LIST, _VIEWS = 0, 1, 2, 3


@functools.cache
def _layout(cls: type[Message]) -> tuple[tuple[str, int], ...]:
    """(name, kind) of each field of a message class, in wire order: looked up once per
    class, not once per message. A ``list[bytes | memoryview]`` field (chunks' data) is
    sent from either and decoded as views of the frame buffer: chunk bytes are not
    copied out of the decrypted read."""
    kinds = {"int": _INT, "bytes": _BYTES, "list[bytes | memoryview]": _VIEWS}
    return tuple((f.name, kinds.get(str(f.type), _LIST)) for f in fields(cls))


@dataclass
class Message:
    """Base class: fields are ``int``, ``bytes`` or ``list[bytes]``, encoded in order."""

    TYPE = 0

    def size(self) -> int:
        """Bytes :meth:`encode` gives (length prefix included), without encoding."""
        total = 4 + 1
        for name, kind in _layout(type(self)):
            value = getattr(self, name)
            if kind == _INT:
                total += 8
            elif kind == _BYTES:
                total += 4 + len(value)
            else:  # a list of bytes or of views
                total += 4 + sum(4 + len(item) for item in value)
        return total

    def encode_at(
        self, out: memoryview, at: int, apart: list[tuple[int, bytes | memoryview]] | None = None
    ) -> int:
        """Write the framed message into ``out`` at ``at`` (room for :meth:`size` bytes);
        return where it ends. Each field is copied once, into the buffer that is then
        encrypted: no parts, joins or growing buffers (the sender reuses that buffer).
        With ``apart``, each chunk's bytes of at least ``APART_FROM`` are not copied:
        only their length is written, and (where they belong in ``out``, the bytes) is
        noted in ``apart``, so that they are encrypted from where they lie
        (:class:`Encoder`)."""
        body = self.size() - 4
        if body > MAX_FRAME:
            raise ValueError(f"{type(self).__name__} of {body} bytes exceeds the frame limit")
        _LENGTH.pack_into(out, at, body)
        out[at + 4] = self.TYPE
        at += 5
        for name, kind in _layout(type(self)):
            value = getattr(self, name)
            if kind == _INT:
                _INTEGER.pack_into(out, at, value)
                at += 8
            elif kind == _BYTES:
                at = _put(out, at, value)
            else:
                _LENGTH.pack_into(out, at, len(value))
                at += 4
                for item in value:
                    if kind == _VIEWS and apart is not None and len(item) >= APART_FROM:
                        _LENGTH.pack_into(out, at, len(item))
                        at += 4
                        apart.append((at, item))
                    else:
                        at = _put(out, at, item)
        return at

    def encode(self) -> bytes:
        out = bytearray(self.size())
        with memoryview(out) as view:
            self.encode_at(view, 0)
        return bytes(out)

    @classmethod
    def decode_body(cls, reader: _Reader) -> Message:
        values: list[int | bytes | memoryview | list[bytes]] = []
        for _, kind in _layout(cls):
            if kind == _INT:
                values.append(reader.integer())
            elif kind == _BYTES:
                values.append(reader.blob())
            elif kind == _VIEWS:
                values.append(reader.views())
            else:
                values.append(reader.blobs())
        reader.finish()
        return cls(*values)


@dataclass
class Hello(Message):
    """First message: protocol version and the sender's device name."""

    TYPE = 1
    version: int
    name: bytes


@dataclass
class Summary(Message):
    """The sender's signed checkpoint of every author's log it holds; with many authors
    it spans several messages (``more`` = 1 until the last)."""

    TYPE = 2
    checkpoints: list[bytes]
    more: int


@dataclass
class Events(Message):
    """Consecutive events of one author in the sender's arrival order. A run may span
    several messages (``more`` = 1 until its last part); the last part carries the
    author's checkpoint at the run's end when the sender has one (else empty)."""

    TYPE = 3
    checkpoint: bytes
    events: list[bytes]
    more: int


@dataclass
class CaughtUp(Message):
    """The sender has sent every event the receiver's summary lacked."""

    TYPE = 4


@dataclass
class WantManifests(Message):
    TYPE = 5
    ids: list[bytes]


@dataclass
class Manifests(Message):
    """Pairs: ids[i] has body bodies[i] (an empty body: the sender does not have it)."""

    TYPE = 6
    ids: list[bytes]
    bodies: list[bytes]


@dataclass
class ManifestPart(Message):
    """A slice of one manifest too large for a ``Manifests`` message: the parts of one
    manifest come in order, back to back, until ``total`` bytes have arrived."""

    TYPE = 12
    id: bytes
    total: int
    data: bytes


@dataclass
class WantChunks(Message):
    TYPE = 7
    hashes: list[bytes]


@dataclass
class Chunks(Message):
    """Pairs: hashes[i] has the bytes data[i] (empty: the sender does not have it),
    asked by one ``WantChunks``, in its order, up to ``CHUNKS_BYTES``: views of the
    sender's read buffers, and of the receiver's decrypted read (see :func:`_layout`).
    Several chunks a message, not one: a message costs each side a frame, an object and
    a dispatch, ~13,400 times per GiB one by one (docs/decisions.md)."""

    TYPE = 16
    hashes: list[bytes]
    data: list[bytes | memoryview]


@dataclass
class Done(Message):
    """The sender has applied everything it received, after ``events_received`` Events
    messages from the receiver; ``files_written`` counts every file it has written so far
    (when it grows, content the receiver could not find may now be there)."""

    TYPE = 9
    events_received: int
    files_written: int


@dataclass
class Error(Message):
    """The sender is closing the session, for this reason."""

    TYPE = 10
    reason: bytes


@dataclass
class Welcome(Message):
    """To a device joining with an invite: the share key it now holds as a member."""

    TYPE = 11
    share_key: bytes


@dataclass
class Ping(Message):
    """Nothing to say: sent when a connection was quiet for a while, so that the peer
    can tell a quiet peer from a vanished one."""

    TYPE = 13


@dataclass
class Addresses(Message):
    """Signed announcements of where devices of the share listen (see
    :mod:`backer.protocol.announce`): the sender's own and the newest it holds of others."""

    TYPE = 14
    announcements: list[bytes]


@dataclass
class Need(Message):
    """What the sender still has to write or delete to hold every live version it
    knows of: ``files`` entries of ``file_bytes`` bytes in all (0 and 0: up to date).
    Sent whenever that changes, at most twice a second (see docs/decisions.md)."""

    TYPE = 15
    files: int
    file_bytes: int


MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Summary,
        Events,
        CaughtUp,
        WantManifests,
        Manifests,
        WantChunks,
        Chunks,
        Done,
        Error,
        Welcome,
        ManifestPart,
        Ping,
        Addresses,
        Need,
    )
}


class Encoder:
    """Frames a batch of messages for the channel to encrypt: the framing and small
    fields into one buffer, reused from batch to batch (the sender encrypts each batch
    before it encodes the next; a new buffer each time is a new allocation and its page
    faults), and each chunk's bytes left where they lie (its read buffer), not copied
    into that buffer first: the channel encrypts every piece straight into its records
    (a copy of every byte sent was ~8 % of the serving node's CPU)."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def encode(self, messages: list[Message]) -> list[memoryview]:
        """The framed messages as pieces to send in order: views of the buffer (valid
        until the next call) and, between them, the chunks' own bytes."""
        size = sum(message.size() for message in messages)
        if len(self.buffer) < size:
            self.buffer = bytearray(size)
        view = memoryview(self.buffer)[:size]
        at = 0
        apart: list[tuple[int, bytes | memoryview]] = []
        for message in messages:
            at = message.encode_at(view, at, apart)
        pieces, start = [], 0
        for end, data in apart:
            pieces += [view[start:end], memoryview(data)]
            start = end
        pieces.append(view[start:at])
        return [piece for piece in pieces if piece]


class FrameReader:
    """Accumulates bytes and yields complete messages; enforces the frame limit."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.buffer = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Message]:
        """Yield every complete message. Frames are decoded in place, from views of
        ``data`` (which must not change while a view of it is held: the channel decrypts
        into a buffer again only once none is left): only a frame cut by the end of
        ``data`` is copied, into ``buffer``, until the next call completes it."""
        view = memoryview(data)
        pos = 0
        try:
            while self.buffer and pos < len(view):  # a frame begun in an earlier call
                have = len(self.buffer)
                need = 4 if have < 4 else 4 + self._size(self.buffer, 0)
                step = min(need - have, len(view) - pos)
                self.buffer += view[pos : pos + step]
                pos += step
                if have >= 4 and len(self.buffer) == need:
                    frame, self.buffer = self.buffer, bytearray()
                    yield _decode(memoryview(frame), 0, need)
            while len(view) - pos >= 4:
                end = pos + 4 + self._size(view, pos)
                if end > len(view):
                    break
                start, pos = pos, end
                yield _decode(view, start, end)
        finally:
            if not self.buffer:
                self.buffer = bytearray(view[pos:])

    def _size(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        (size,) = _LENGTH.unpack_from(data, offset)
        if size > self.max_frame or size == 0:
            raise ProtocolError(f"frame of {size} bytes is outside the allowed 1..{self.max_frame}")
        return size


def _decode(view: memoryview, start: int, end: int) -> Message:
    """The message framed in ``view[start:end]`` (length prefix included)."""
    message_type = MESSAGE_TYPES.get(view[start + 4])
    if message_type is None:
        raise ProtocolError(f"unknown message type {view[start + 4]}")
    return message_type.decode_body(_Reader(view[start + 5 : end]))
