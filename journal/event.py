"""Signed journal events and signed checkpoints, with one fixed binary layout each.

The layout is fixed-width apart from the trailing payload, so encoding is
deterministic by construction and decoding rejects anything that is not exactly the
bytes an honest author would produce. An event's id is the BLAKE3 hash of its signed
bytes (body and signature); the body names the previous event's id, which chains an
author's log. A checkpoint is an author's signature over ``(length, merkle root)`` of
its own log: one verify then vouches for a whole batch of events.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

import nacl.exceptions
import nacl.signing
from blake3 import blake3

EVENT_MAGIC = b"BKEV\x01"
CHECKPOINT_MAGIC = b"BKCP\x01"
KEY_SIZE = 32
SIG_SIZE = 64
HASH_SIZE = 32
NO_PREVIOUS = bytes(HASH_SIZE)
MAX_PAYLOAD = 16 * 1024 * 1024

_HEADER = struct.Struct(">5s32sQ32sQHI")  # magic, author, seq, prev, time_ms, kind, payload length
_CHECKPOINT = struct.Struct(">5s32sQ32s")  # magic, author, length, root


_MIN_EVENT = _HEADER.size + SIG_SIZE
_new_tuple = tuple.__new__


class InvalidEvent(ValueError):
    """Bytes that are not a well-formed, correctly signed event or checkpoint."""


def _verify(author: bytes, message: bytes, signature: bytes) -> None:
    try:
        nacl.signing.VerifyKey(author).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError) as exc:
        raise InvalidEvent("bad signature") from exc


class Event(NamedTuple):
    """One entry of an author's log. ``raw`` is the exact signed wire form.

    A named tuple rather than a dataclass: catch-up decodes >100k of these a second.
    """

    author: bytes
    seq: int
    prev: bytes
    time_ms: int
    kind: int
    payload: bytes
    signature: bytes
    raw: bytes
    id: bytes

    @classmethod
    def create(  # type: ignore[override]
        cls,
        key: nacl.signing.SigningKey,
        seq: int,
        prev: bytes,
        time_ms: int,
        kind: int,
        payload: bytes,
    ) -> Event:
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
        author = bytes(key.verify_key)
        body = _HEADER.pack(EVENT_MAGIC, author, seq, prev, time_ms, kind, len(payload)) + payload
        signature = key.sign(body).signature
        raw = body + signature
        return cls(author, seq, prev, time_ms, kind, payload, signature, raw, blake3(raw).digest())

    @classmethod
    def decode(cls, raw: bytes) -> Event:
        """Parse wire bytes without checking the signature (see :meth:`verify`)."""
        if type(raw) is not bytes:
            raw = bytes(raw)
        total = len(raw)
        if total < _MIN_EVENT:
            raise InvalidEvent("event is truncated")
        magic, author, seq, prev, time_ms, kind, size = _HEADER.unpack_from(raw)
        if magic != EVENT_MAGIC:
            raise InvalidEvent("not a backer event (bad magic or version)")
        if total != _MIN_EVENT + size:
            raise InvalidEvent("event length does not match its payload size")
        if (seq == 0) != (prev == NO_PREVIOUS):
            raise InvalidEvent("only the first event of a log may lack a previous id")
        payload = raw[_HEADER.size : _HEADER.size + size]
        fields = (
            author,
            seq,
            prev,
            time_ms,
            kind,
            payload,
            raw[-SIG_SIZE:],
            raw,
            blake3(raw).digest(),
        )
        return _new_tuple(cls, fields)  # skips NamedTuple's keyword handling: hot path

    def __repr__(self) -> str:
        return (
            f"Event(author={self.author.hex()[:12]}, seq={self.seq}, kind={self.kind}, "
            f"payload={len(self.payload)} B, id={self.id.hex()[:12]})"
        )

    def verify(self) -> None:
        """Check the author's signature over the body; raise :class:`InvalidEvent`."""
        _verify(self.author, self.raw[:-SIG_SIZE], self.signature)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """An author's signed statement "my log has ``length`` events and this ``root``"."""

    author: bytes
    length: int
    root: bytes
    signature: bytes

    @staticmethod
    def _message(author: bytes, length: int, root: bytes) -> bytes:
        return _CHECKPOINT.pack(CHECKPOINT_MAGIC, author, length, root)

    @classmethod
    def create(cls, key: nacl.signing.SigningKey, length: int, root: bytes) -> Checkpoint:
        author = bytes(key.verify_key)
        signature = key.sign(cls._message(author, length, root)).signature
        return cls(author, length, root, signature)

    def encode(self) -> bytes:
        return self._message(self.author, self.length, self.root) + self.signature

    @classmethod
    def decode(cls, raw: bytes) -> Checkpoint:
        raw = bytes(raw)
        if len(raw) != _CHECKPOINT.size + SIG_SIZE:
            raise InvalidEvent("checkpoint has the wrong size")
        magic, author, length, root = _CHECKPOINT.unpack_from(raw)
        if magic != CHECKPOINT_MAGIC:
            raise InvalidEvent("not a backer checkpoint (bad magic or version)")
        return cls(author, length, root, raw[_CHECKPOINT.size :])

    def verify(self) -> None:
        _verify(self.author, self._message(self.author, self.length, self.root), self.signature)
