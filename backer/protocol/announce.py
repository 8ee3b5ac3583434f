"""A device's signed announcement of where it listens, gossiped between members.

Layout: ``"BKA1" | device 32 | share id 16 | time_ms u64 | count u8 | count x (family u8
(4 or 6) | address 4 or 16 | port u16) | signature 64``, the signature by ``device``
over everything before it. Only IP literals travel (no host names a receiver would have
to resolve), at most :data:`MAX_ADDRESSES` of them. Binding the share id stops an
announcement made for one share from being replayed into another; the time orders a
device's announcements (the newest wins) and is the only thing a relaying member could
replay: an older announcement, which loses to the one already held.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import nacl.exceptions
import nacl.signing

MAGIC = b"BKA1"
MAX_ADDRESSES = 16
_HEAD = struct.Struct(">4s32s16sQB")
_PORT = struct.Struct(">H")
MAX_SIZE = _HEAD.size + MAX_ADDRESSES * (1 + 16 + 2) + 64


@dataclass(frozen=True)
class Announcement:
    device: bytes
    share_id: bytes
    time_ms: int
    addresses: tuple[tuple[str, int], ...]
    raw: bytes

    @classmethod
    def make(
        cls,
        key: nacl.signing.SigningKey,
        share_id: bytes,
        time_ms: int,
        addresses: Iterable[tuple[str, int]],
    ) -> Announcement:
        """Sign ``addresses`` (IP literals; others are left out, as are duplicates and any
        beyond :data:`MAX_ADDRESSES`) as this device's listen addresses at ``time_ms``."""
        parts: list[bytes] = []
        kept: list[tuple[str, int]] = []
        for host, port in dict.fromkeys(addresses):
            try:
                ip = ipaddress.ip_address(host.strip("[]"))
            except ValueError:
                continue
            if len(kept) == MAX_ADDRESSES or not 0 < port < 65536:
                continue
            parts.append(bytes([ip.version]) + ip.packed + _PORT.pack(port))
            kept.append((str(ip), port))
        device = bytes(key.verify_key)
        body = _HEAD.pack(MAGIC, device, share_id, time_ms, len(kept)) + b"".join(parts)
        raw = body + key.sign(body).signature
        return cls(device, share_id, time_ms, tuple(kept), raw)

    @staticmethod
    def claims(raw: bytes) -> tuple[bytes, int]:
        """The device and time ``raw`` claims, unverified: enough to skip an announcement
        that would lose to one already held without spending a signature check on it."""
        if len(raw) < _HEAD.size:
            raise ValueError(f"an announcement of {len(raw)} bytes")
        _, device, _, time_ms, _ = _HEAD.unpack_from(raw)
        return device, time_ms

    @classmethod
    def decode(cls, raw: bytes) -> Announcement:
        """Parse and verify ``raw``; ValueError if it is malformed or its signature fails."""
        if not _HEAD.size + 64 <= len(raw) <= MAX_SIZE:
            raise ValueError(f"an announcement of {len(raw)} bytes")
        magic, device, share_id, time_ms, count = _HEAD.unpack_from(raw)
        if magic != MAGIC or count > MAX_ADDRESSES:
            raise ValueError("not an address announcement")
        offset, addresses = _HEAD.size, []
        for _ in range(count):
            family = raw[offset]  # in range: 64 signature bytes follow
            size = {4: 4, 6: 16}.get(family)
            if size is None:
                raise ValueError(f"unknown address family {family}")
            if offset + 1 + size + 2 + 64 > len(raw):
                raise ValueError("an announcement is truncated")
            ip = ipaddress.ip_address(raw[offset + 1 : offset + 1 + size])
            (port,) = _PORT.unpack_from(raw, offset + 1 + size)
            if port == 0:
                raise ValueError("port 0")
            addresses.append((str(ip), port))
            offset += 1 + size + 2
        if offset + 64 != len(raw):
            raise ValueError("an announcement's length does not match its addresses")
        try:
            nacl.signing.VerifyKey(device).verify(raw[:offset], raw[offset:])
        except (nacl.exceptions.BadSignatureError, ValueError) as exc:
            raise ValueError("an announcement's signature does not verify") from exc
        return cls(device, share_id, time_ms, tuple(addresses), bytes(raw))
