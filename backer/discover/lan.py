"""LAN discovery: devices of a share find each other on the local network, and a
non-member on that network learns nothing.

Every ``interval`` seconds (with jitter) a device broadcasts, for each share it serves,
one UDP datagram to the broadcast address of every IPv4 network it is on:

    nonce 24 | hint 4 | XChaCha20-Poly1305(key, nonce, version 1 | share id 16 |
                         device 32 | time_ms u64 | TCP port u16) | tag 16   (103 bytes)

with ``key | hint key = BLAKE3-derive-key("… LAN discovery v1", share key)`` (64 bytes)
and ``hint = BLAKE3-keyed(hint key, nonce)[:4]``. The nonce is fresh and random each
time, so to anyone without the share key two datagrams of one device look unrelated and
every datagram is 103 random-looking bytes: no share id, device id or name is in clear.
A receiver checks the hint under each key of its shares (at most :data:`MAX_KEYS` per
datagram; a few µs each, where a failed decryption costs about 20) and opens the datagram
with the key that matches; it accepts one that opens, names the share of that key
and another device, and is dated within :data:`WINDOW_MS` of its clock and later than the
last one of that device: a replay of an older datagram is ignored; a replay of the newest
within the window can at most make the receiver dial the replayer's address, where the
handshake (the share key and the device key) fails. The device is then reported at the
datagram's source IP with the announced port.

The pure :func:`seal` / :func:`unseal` are the format; :class:`LanDiscovery` is the
asyncio component (one UDP socket, one sender task it owns).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import blake3
import nacl.bindings
import nacl.exceptions

from backer.connections.addresses import broadcast_addresses
from backer.errors import BackerError

PORT = 7654  # UDP; the TCP listener's default port number
INTERVAL_S = 30.0  # between two announcements of a share (± 20 %)
VERSION = 1
_PLAIN = struct.Struct(">B16s32sQH")
NONCE = 24
HINT = 4
PACKET_SIZE = NONCE + HINT + _PLAIN.size + 16
MAX_KEYS = 64  # keys tried per datagram, over every share
WINDOW_MS = 10 * 60 * 1000  # a datagram's time may differ from ours by this much
RATE = 50.0  # datagrams read per second at most (a burst of twice that), the rest dropped
RECEIVE_BUFFER = 16 * 1024  # bytes the kernel queues for the socket; a flood's excess is dropped
PAUSE_S = 0.2  # a spent budget stops reading for this long (RATE * PAUSE_S datagrams' worth)
MAX_DEVICES = 4096  # (share, device) pairs whose last time is remembered
MIN_GAP_S = 1.0  # between two announcing rounds, however often woken
FIRST_ROUNDS = 3  # rounds MIN_GAP_S apart for a share newly announced (at start, or once
# it is served): one lost datagram must not cost a minute
REPORT_EVERY_S = 5.0  # one report of a device per share at most this often
_CONTEXT = "backer 2026-12-01 LAN discovery v1"
log = logging.getLogger("backer.discover")


@dataclass(frozen=True)
class LanKey:
    """The keys of a share's discovery datagrams."""

    box: bytes  # XChaCha20-Poly1305
    hinter: Any  # BLAKE3 keyed with the hint key, never updated itself: copied per use

    def hint(self, nonce: bytes) -> bytes:
        hasher = self.hinter.copy()
        hasher.update(nonce)
        return hasher.digest(length=HINT)


def lan_key(share_key: bytes) -> LanKey:
    """Derived, so the share key itself is used for nothing but the handshake it is for."""
    derived = blake3.blake3(share_key, derive_key_context=_CONTEXT).digest(length=64)
    return LanKey(derived[:32], blake3.blake3(key=derived[32:]))


@dataclass(frozen=True)
class Beacon:
    """What one datagram says: ``device`` of ``share_id`` listens on TCP ``port``."""

    share_id: bytes
    device: bytes
    time_ms: int
    port: int


def seal(beacon: Beacon, key: LanKey, nonce: bytes | None = None) -> bytes:
    """The datagram for ``beacon`` under ``key`` (a :func:`lan_key`); a fresh random
    nonce unless one is given (tests)."""
    nonce = nonce or os.urandom(NONCE)
    plain = _PLAIN.pack(VERSION, beacon.share_id, beacon.device, beacon.time_ms, beacon.port)
    box = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plain, None, nonce, key.box)
    return nonce + key.hint(nonce) + box


def unseal(packet: bytes, keys: Iterable[tuple[bytes, LanKey]]) -> Beacon | None:
    """The beacon in ``packet`` if one of ``keys`` ((share id, lan key), at most
    :data:`MAX_KEYS` tried) opens it and it names that share; else None."""
    if len(packet) != PACKET_SIZE:
        return None
    nonce, hint, box = packet[:NONCE], packet[NONCE : NONCE + HINT], packet[NONCE + HINT :]
    for index, (share_id, key) in enumerate(keys):
        if index == MAX_KEYS:
            return None
        if key.hint(nonce) != hint:
            continue
        try:
            plain = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                box, None, nonce, key.box
            )
        except nacl.exceptions.CryptoError:
            return None
        version, named, device, time_ms, port = _PLAIN.unpack(plain)
        if version != VERSION or named != share_id or port == 0:
            return None
        return Beacon(share_id, device, time_ms, port)
    return None


@dataclass(frozen=True)
class LanShare:
    """A share this device takes part in discovery for."""

    share_id: bytes
    keys: tuple[bytes, ...]  # its share keys, newest first: sent with the first, any opens
    device: bytes  # this device's key
    port: int  # the TCP port it listens on for the share (0: listen for others only)


Found = Callable[[bytes, bytes, list[tuple[str, int]]], None]


class Seen:
    """Which datagrams to believe: the newest per device within the time window, at most
    one report per device every :data:`REPORT_EVERY_S`; bounded memory."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.last: OrderedDict[tuple[bytes, bytes], int] = OrderedDict()  # -> time_ms
        self.reported: dict[tuple[bytes, bytes, str, int], float] = {}

    def fresh(self, beacon: Beacon) -> bool:
        now_ms = int(self.clock() * 1000)
        pair = (beacon.share_id, beacon.device)
        if abs(beacon.time_ms - now_ms) > WINDOW_MS or beacon.time_ms <= self.last.get(pair, -1):
            return False
        self.last[pair] = beacon.time_ms
        self.last.move_to_end(pair)
        while len(self.last) > MAX_DEVICES:
            self.last.popitem(last=False)
        return True

    def worth_reporting(self, beacon: Beacon, host: str) -> bool:
        now = self.clock()
        key = (beacon.share_id, beacon.device, host, beacon.port)
        if now - self.reported.get(key, -REPORT_EVERY_S) < REPORT_EVERY_S:
            return False
        if len(self.reported) >= MAX_DEVICES:
            self.reported = {k: t for k, t in self.reported.items() if now - t < REPORT_EVERY_S}
        self.reported[key] = now
        return True


class LanDiscovery:
    """Announce this device's shares on the LAN and report members heard there.

    ``announcements()`` is asked before every round (shares come and go, keys rotate);
    ``on_found(share_id, device, [(host, port)])`` is called in the event loop for each
    member heard (not more than once per :data:`REPORT_EVERY_S` per address).
    ``targets()`` gives the broadcast addresses (default: every IPv4 network's)."""

    def __init__(
        self,
        port: int,
        announcements: Callable[[], list[LanShare]],
        on_found: Found,
        *,
        interval: float = INTERVAL_S,
        targets: Callable[[], list[str]] = broadcast_addresses,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.port = port
        self.announcements = announcements
        self.on_found = on_found
        self.interval = interval
        self.targets = targets
        self.clock = clock
        self.seen = Seen(clock)
        self.sock: socket.socket | None = None
        self.resume: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.soon = asyncio.Event()
        self.tokens, self.refilled = 2 * RATE, time.monotonic()
        self._keys: dict[bytes, LanKey] = {}  # share key -> its derived keys
        self.rounds: dict[bytes, int] = {}  # share id -> rounds it was announced in, up to
        # FIRST_ROUNDS (shares no longer announced are dropped)
        self.sent = 0  # datagrams sent and read (read: the right size, within the rate)
        self.heard = 0

    async def __aenter__(self) -> LanDiscovery:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            sock.setblocking(False)
            sock.bind(("", self.port))
        except OSError as exc:
            sock.close()
            raise BackerError(
                f"LAN discovery cannot listen on UDP port {self.port}: {exc.strerror}"
            ) from exc
        self.sock = sock
        loop.add_reader(sock.fileno(), self._readable)
        self.task = asyncio.create_task(self._announce_loop())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.resume is not None:
            self.resume.cancel()
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()

    def wake(self) -> None:
        """Announce now (e.g. this device's addresses changed, or a share is served now:
        it then gets its first rounds too)."""
        self.soon.set()

    # -- sending --------------------------------------------------------------------------

    async def _announce_loop(self) -> None:
        """A share newly announced (at start, or served since) goes out in
        :data:`FIRST_ROUNDS` rounds a second apart (UDP may drop one; mDNS, RFC 6762
        §8.3, repeats its first announcement likewise); then a round every ``interval``
        (±20 %, so devices do not fall in step), or sooner when woken, but never two
        within a second."""
        while True:
            started = time.monotonic()
            self.announce()
            self.soon.clear()
            gap = min(MIN_GAP_S, self.interval)
            starting = any(rounds < FIRST_ROUNDS for rounds in self.rounds.values())
            wait = gap if starting else self.interval * random.uniform(0.8, 1.2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.soon.wait(), wait)
            await asyncio.sleep(max(0.0, started + gap - time.monotonic()))

    def announce(self) -> None:
        """One datagram per share with a port, to every broadcast address."""
        if self.sock is None:
            return
        targets = self.targets()
        now_ms = int(self.clock() * 1000)
        rounds: dict[bytes, int] = {}
        for share in self.announcements():
            if not share.port or not share.keys:
                continue
            beacon = Beacon(share.share_id, share.device, now_ms, share.port)
            packet = seal(beacon, self._lan_key(share.keys[0]))
            for target in targets:
                try:
                    self.sock.sendto(packet, (target, self.port))
                    self.sent += 1
                except OSError as exc:  # a full send buffer, an unreachable network
                    log.debug("LAN discovery: %s", exc)
            rounds[share.share_id] = min(self.rounds.get(share.share_id, 0) + 1, FIRST_ROUNDS)
        self.rounds = rounds

    def _lan_key(self, share_key: bytes) -> LanKey:
        if share_key not in self._keys:
            if len(self._keys) > 4 * MAX_KEYS:
                self._keys.clear()
            self._keys[share_key] = lan_key(share_key)
        return self._keys[share_key]

    # -- receiving ------------------------------------------------------------------------

    def _admit(self) -> bool:
        """The read budget: :data:`RATE` datagrams a second, bursts of twice that."""
        now = time.monotonic()
        self.tokens = min(2 * RATE, self.tokens + (now - self.refilled) * RATE)
        self.refilled = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def _readable(self) -> None:
        """Read datagrams while the budget lasts, whatever their size (each read costs
        the loop); once it is spent, stop reading for :data:`PAUSE_S` and let the kernel
        drop the excess (a small receive buffer): a flood costs the budget, no more."""
        assert self.sock is not None
        while self._admit():
            try:
                data, addr = self.sock.recvfrom(2 * PACKET_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                log.debug("LAN discovery: %s", exc)
                return
            self.received(data, addr)
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.sock.fileno())
        self.resume = loop.call_later(PAUSE_S, self._resume)

    def _resume(self) -> None:
        if self.sock is not None:
            asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)

    def received(self, data: bytes, addr: Any) -> None:
        """One datagram read within the budget: a beacon of a member is reported."""
        if len(data) != PACKET_SIZE:
            return
        self.heard += 1
        shares = self.announcements()
        own = {share.share_id: share.device for share in shares}
        keys = [  # the newest key of every share first, then older ones
            (share.share_id, self._lan_key(share.keys[depth]))
            for depth in range(max((len(s.keys) for s in shares), default=0))
            for share in shares
            if depth < len(share.keys)
        ]
        beacon = unseal(data, keys)
        if beacon is None or beacon.device == own.get(beacon.share_id):
            return
        pair = (beacon.share_id, beacon.device)
        newcomer = pair not in self.seen.last
        if not self.seen.fresh(beacon):
            return
        if newcomer:  # it just started, or we did: let it hear us now, not in a minute
            self.wake()
        host = str(addr[0])
        if self.seen.worth_reporting(beacon, host):
            self.on_found(beacon.share_id, beacon.device, [(host, beacon.port)])
