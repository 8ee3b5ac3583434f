"""Where the devices of a share may be reached, and where this device can be reached.

:class:`AddressBook` (one per open share, kept in the share's SQLite) learns addresses
from invites, from members' signed announcements (:mod:`backer.protocol.announce`,
gossiped by sessions), from members that connected to us and from LAN discovery, and
lists a device's addresses best first: the one last connected to, then the most
recently seen. It is bounded, so a member announcing without end cannot grow it.

The interface functions enumerate this machine's addresses (every interface, not only
what the host name resolves to) for invites, announcements and LAN broadcasts.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import nacl.signing

from backer.errors import BackerError
from backer.protocol.announce import Announcement

if TYPE_CHECKING:
    from backer.db.catalog import Catalog

MAX_PER_DEVICE = 16  # addresses kept per device (the worst are forgotten first)
MAX_DEVICES = 1024  # devices with addresses (a share has at most 1,000 members)
SKEW_MS = 10 * 60 * 1000  # an announcement dated further ahead than this is ignored
SOURCES = frozenset({"invite", "announce", "inbound", "lan", "manual"})
_HOST = re.compile(r"[A-Za-z0-9.:%_-]{1,253}")


def _now_ms() -> int:
    return int(time.time() * 1000)


class AddressBook:
    """The known addresses of a share's devices, and the announcements to pass on."""

    def __init__(
        self,
        catalog: Catalog,
        share_id: bytes,
        key: nacl.signing.SigningKey,
        clock: Callable[[], int] = _now_ms,
    ) -> None:
        self.catalog = catalog
        self.share_id = share_id
        self.key = key
        self.device = bytes(key.verify_key)
        self.clock = clock
        self.own: Announcement | None = None
        self.held = catalog.announcements()  # device -> (time_ms, raw)
        self.on_learned: Callable[[bytes, str, int, str], None] | None = None  # (a node
        # dials it; the last argument is the source)

    # -- addresses --------------------------------------------------------------------

    def learn(self, device: bytes, host: str, port: int, source: str) -> bool:
        """Remember that ``device`` may be reached at ``host``:``port``; False (nothing
        kept) for this device itself or an address that is not one."""
        if source not in SOURCES:
            raise ValueError(f"unknown address source {source!r}")
        return self._note(device, host, port, source)

    def connected(self, device: bytes, host: str, port: int) -> None:
        """A session with ``device`` was established by dialling ``host``:``port``."""
        self._note(device, host, port, None)

    def addresses(self, device: bytes) -> list[tuple[str, int]]:
        """Where to dial ``device``, best first."""
        return [(host, port) for host, port, *_ in self.catalog.addresses_of(device)]

    def _note(self, device: bytes, host: str, port: int, source: str | None) -> bool:
        host = host.strip("[]")
        if device == self.device or not _HOST.fullmatch(host) or not 0 < port < 65536:
            return False
        with self.catalog.conn:
            new_device = not self.catalog.addresses_of(device)
            self.catalog.note_address(device, host, port, self.clock(), source)
            self.catalog.drop_addresses(device, MAX_PER_DEVICE)
            if new_device:
                for stale in self.catalog.address_devices()[MAX_DEVICES:]:
                    self.catalog.drop_addresses(stale)
                    self.catalog.drop_announcement(stale)
                    self.held.pop(stale, None)
        if source is not None and self.on_learned is not None:
            self.on_learned(device, host, port, source)
        return True

    # -- announcements (backer.protocol.session.AddressGossip) -------------------------

    def announce(self, addresses: Iterable[tuple[str, int]]) -> Announcement:
        """Sign this device's listen addresses anew (later than any earlier one): what
        sessions opened from now on tell their peers. Loopback ones are left out when
        there are others: on another machine they would name that machine."""
        listed = list(addresses)
        outside = [(host, port) for host, port in listed if not _is_loopback(host.strip("[]"))]
        last = self.own.time_ms if self.own else 0
        self.own = Announcement.make(
            self.key, self.share_id, max(self.clock(), last + 1), outside or listed
        )
        return self.own

    def announcements(self) -> list[bytes]:
        others = sorted(self.held.values(), reverse=True)
        return ([self.own.raw] if self.own else []) + [raw for _, raw in others]

    def is_news(self, device: bytes, time_ms: int) -> bool:
        if device == self.device or time_ms > self.clock() + SKEW_MS:
            return False
        return time_ms > self.held.get(device, (-1, b""))[0]

    def heard(self, announcement: Announcement) -> bool:
        device = announcement.device
        if announcement.share_id != self.share_id or not self.is_news(device, announcement.time_ms):
            return False
        self.held[device] = (announcement.time_ms, announcement.raw)
        with self.catalog.conn:
            self.catalog.put_announcement(device, announcement.time_ms, announcement.raw)
        for host, port in announcement.addresses:
            self._note(device, host, port, "announce")
        return True


# -- this machine's addresses ---------------------------------------------------------------


def _interfaces() -> Iterator[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    """Every address of every interface that is up (loopback included)."""
    import psutil  # (here: ~20 ms to load, which only invites and a listening node need)

    stats = psutil.net_if_stats()
    for name, entries in psutil.net_if_addrs().items():
        if name in stats and not stats[name].isup:
            continue
        for entry in entries:
            if entry.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                ip = ipaddress.ip_address(entry.address.split("%")[0])
                mask = int(ipaddress.ip_address(entry.netmask)) if entry.netmask else -1
            except ValueError:
                continue
            prefix = bin(mask).count("1") if mask >= 0 else ip.max_prefixlen
            yield ipaddress.ip_interface(f"{ip}/{prefix}")


def interface_addresses(version: int | None = None) -> list[str]:
    """This machine's addresses others can dial (IPv4 or IPv6 only if ``version``):
    loopback, link-local and unspecified ones left out."""
    found = []
    for interface in _interfaces():
        ip = interface.ip
        if version not in (None, ip.version):
            continue
        if ip.is_loopback or ip.is_link_local or ip.is_unspecified:
            continue
        found.append(str(ip))
    return list(dict.fromkeys(found))


def broadcast_addresses() -> list[str]:
    """The IPv4 broadcast address of every network this machine is on (not loopback)."""
    found = []
    for interface in _interfaces():
        network = interface.network
        if network.version == 4 and not interface.ip.is_loopback and network.prefixlen < 31:
            found.append(str(network.broadcast_address))
    return list(dict.fromkeys(found))


def parse_address(text: str, listening: bool = False) -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[::1]:port``) into a (host, port) pair; ``listening``:
    an address to listen on, where port 0 asks the system for any free port (what a
    script or a test wants), which the listener then reports as bound."""
    host, sep, port = text.strip().rpartition(":")
    lowest = 0 if listening else 1
    if not sep or not port.isdigit() or not lowest <= int(port) < 65536 or not host:
        raise BackerError(f"not an address (expected HOST:PORT): {text!r}")
    return host.strip("[]"), int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def advertised(host: str, port: int) -> tuple[str, ...]:
    """Addresses to put in a token or an announcement for a listener on ``host``: a
    wildcard host stands for every address of this machine of its family, loopback last
    (the fallback, and all there is on a machine without a network)."""
    if host not in ("0.0.0.0", "::", ""):
        return (format_address(host, port),)
    version = {"0.0.0.0": 4, "::": 6}.get(host)
    loopback = ["::1"] if version == 6 else ["127.0.0.1"]
    return tuple(format_address(a, port) for a in [*interface_addresses(version), *loopback])


def loopback_only(addresses: Iterable[str]) -> bool:
    """Whether every one of ``addresses`` (``host:port``) is reachable from this machine
    alone."""
    hosts = [text.rpartition(":")[0].strip("[]") for text in addresses]
    return all(_is_loopback(host) for host in hosts)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
