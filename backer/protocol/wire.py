"""Session messages and their framing: ``u32 length | u8 type | body``, hard size limit.

Bodies are sequences of fixed-width integers and length-prefixed byte strings, read
with bounds checks; anything malformed or oversized raises :class:`ProtocolError`,
which closes the session with that reason. Nothing here does I/O: :class:`FrameReader`
consumes bytes and yields messages.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, fields

PROTOCOL_VERSION = 3  # 3: Addresses
MAX_FRAME = 8 * 1024 * 1024
_LENGTH = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer broke the protocol; the session must close with this reason."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.offset = 0

    def take(self, size: int) -> bytes:
        if size < 0 or self.offset + size > len(self.data):
            raise ProtocolError("message is truncated")
        chunk = bytes(self.data[self.offset : self.offset + size])
        self.offset += size
        return chunk

    def integer(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def blob(self) -> bytes:
        return self.take(int.from_bytes(self.take(4), "big"))

    def blobs(self) -> list[bytes]:
        count = int.from_bytes(self.take(4), "big")
        if count > MAX_FRAME // 4:
            raise ProtocolError("list is longer than a frame could hold")
        return [self.blob() for _ in range(count)]

    def finish(self) -> None:
        if self.offset != len(self.data):
            raise ProtocolError("message has trailing bytes")


def _blob(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


@dataclass
class Message:
    """Base class: fields are ``int``, ``bytes`` or ``list[bytes]``, encoded in order."""

    TYPE = 0

    def encode(self) -> bytes:
        parts = [bytes([self.TYPE])]
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int):
                parts.append(value.to_bytes(8, "big"))
            elif isinstance(value, bytes):
                parts.append(_blob(value))
            else:
                parts.append(len(value).to_bytes(4, "big"))
                parts.extend(_blob(item) for item in value)
        body = b"".join(parts)
        if len(body) > MAX_FRAME:
            raise ValueError(f"{type(self).__name__} of {len(body)} bytes exceeds the frame limit")
        return _LENGTH.pack(len(body)) + body

    @classmethod
    def decode_body(cls, reader: _Reader) -> Message:
        values = []
        for f in fields(cls):
            kind = str(f.type)
            if kind == "int":
                values.append(reader.integer())
            elif kind == "bytes":
                values.append(reader.blob())
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
class Chunk(Message):
    """One chunk's bytes (empty data: the sender does not have it)."""

    TYPE = 8
    hash: bytes
    data: bytes


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
        Chunk,
        Done,
        Error,
        Welcome,
        ManifestPart,
        Ping,
        Addresses,
    )
}


class FrameReader:
    """Accumulates bytes and yields complete messages; enforces the frame limit."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.buffer = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> Iterator[Message]:
        """Yield every complete message; the consumed prefix is dropped once, at the end
        (dropping it per message would move the rest of the buffer each time)."""
        self.buffer += data
        offset = 0
        try:
            while len(self.buffer) - offset >= 4:
                (size,) = _LENGTH.unpack_from(self.buffer, offset)
                if size > self.max_frame or size == 0:
                    raise ProtocolError(
                        f"frame of {size} bytes is outside the allowed 1..{self.max_frame}"
                    )
                if len(self.buffer) - offset < 4 + size:
                    return
                body = bytes(self.buffer[offset + 4 : offset + 4 + size])
                offset += 4 + size
                message_type = MESSAGE_TYPES.get(body[0])
                if message_type is None:
                    raise ProtocolError(f"unknown message type {body[0]}")
                yield message_type.decode_body(_Reader(body[1:]))
        finally:
            del self.buffer[:offset]
