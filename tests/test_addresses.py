"""The address book and members' signed announcements of their listen addresses."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
from pathlib import Path

import nacl.signing
import pytest

from backer.connections.addresses import MAX_PER_DEVICE, AddressBook
from backer.model.share import Share
from backer.protocol.announce import MAX_ADDRESSES, Announcement
from backer.protocol.invite import InviteToken
from backer.protocol.session import MAX_ANNOUNCEMENTS, Session
from backer.protocol.wire import Addresses, ProtocolError
from tests.e2e import Device, free_port, invite, wait_until
from tests.helpers import Links, make_devices, pump, sync, syncing
from tests.netns import in_ns, namespaces, needs_netns, subnet_of


class Clock:
    def __init__(self, now: int = 1_800_000_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def _book(share: Share, clock: Clock | None = None) -> AddressBook:
    return AddressBook(share.catalog, share.share_id, share.key, clock or Clock())


def _session(share: Share, book: AddressBook, **kwargs: object) -> Session:
    return Session(share, share.root.name, addresses=book, **kwargs)  # type: ignore[arg-type]


# -- the announcement record --------------------------------------------------------------


def test_an_announcement_round_trips_and_keeps_ip_literals_only() -> None:
    key = nacl.signing.SigningKey.generate()
    wanted = [("10.0.0.5", 7654), ("fd00::2", 7654), ("laptop.local", 7654), ("10.0.0.5", 7654)]
    made = Announcement.make(key, bytes(16), 42, wanted)
    assert made.addresses == (("10.0.0.5", 7654), ("fd00::2", 7654))
    read = Announcement.decode(made.raw)
    assert read == made and read.device == bytes(key.verify_key) and read.time_ms == 42
    many = Announcement.make(key, bytes(16), 1, [(f"10.0.{n}.1", 1) for n in range(100)])
    assert len(Announcement.decode(many.raw).addresses) == MAX_ADDRESSES


@pytest.mark.parametrize("where", [4, 40, 60, 64, -1])
def test_a_tampered_announcement_is_refused(where: int) -> None:
    raw = bytearray(
        Announcement.make(
            nacl.signing.SigningKey.generate(), bytes(16), 7, [("10.0.0.5", 7654)]
        ).raw
    )
    raw[where] ^= 1
    with pytest.raises(ValueError):
        Announcement.decode(bytes(raw))


@pytest.mark.parametrize("cut", [1, 10, 70, 200])
def test_a_truncated_or_padded_announcement_is_refused(cut: int) -> None:
    raw = Announcement.make(
        nacl.signing.SigningKey.generate(), bytes(16), 7, [("10.0.0.5", 7654), ("fd00::1", 1)]
    ).raw
    with pytest.raises(ValueError):
        Announcement.decode(raw[:-cut])
    with pytest.raises(ValueError):
        Announcement.decode(raw + bytes(cut))


# -- the book ---------------------------------------------------------------------------------


def test_addresses_are_listed_last_connected_first_then_newest(tmp_path: Path) -> None:
    (a,) = make_devices(tmp_path, 1)
    clock = Clock()
    book = _book(a, clock)
    peer = bytes(32)
    for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        clock.now += 1000
        book.learn(peer, host, 7654, "announce")
    assert book.addresses(peer) == [("10.0.0.3", 7654), ("10.0.0.2", 7654), ("10.0.0.1", 7654)]
    book.connected(peer, "10.0.0.1", 7654)
    clock.now += 1000
    book.learn(peer, "10.0.0.9", 7654, "lan")
    assert book.addresses(peer)[:2] == [("10.0.0.1", 7654), ("10.0.0.9", 7654)]
    assert not book.learn(a.device, "10.0.0.1", 7654, "lan")  # never this device itself
    assert not book.learn(peer, "bad host", 7654, "lan") and not book.learn(peer, "h", 0, "lan")
    with pytest.raises(ValueError):
        book.learn(peer, "10.0.0.1", 1, "made up")


def test_the_book_survives_a_reopen_of_the_share(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    _book(a).learn(b.device, "10.0.0.1", 7654, "invite")
    key, root = a.key, a.root
    a.close()
    with Share.open(root, key) as again:
        assert _book(again).addresses(b.device) == [("10.0.0.1", 7654)]


def test_a_device_flooding_addresses_keeps_a_bounded_number(tmp_path: Path) -> None:
    (a,) = make_devices(tmp_path, 1)
    clock = Clock()
    book = _book(a, clock)
    peer = bytes(32)
    book.learn(peer, "10.9.9.9", 7654, "invite")
    book.connected(peer, "10.9.9.9", 7654)
    for n in range(200):
        clock.now += 1
        book.learn(peer, f"10.1.{n // 250}.{n % 250}", 7654, "announce")
    kept = book.addresses(peer)
    assert len(kept) == MAX_PER_DEVICE
    assert kept[0] == ("10.9.9.9", 7654)  # the one that worked is never pushed out
    assert kept[1] == ("10.1.0.199", 7654)


# -- gossip in sessions ---------------------------------------------------------------------


def test_members_learn_each_others_announced_addresses_and_pass_them_on(tmp_path: Path) -> None:
    a, b, c = make_devices(tmp_path, 3)
    books = [_book(s) for s in (a, b, c)]
    books[0].announce([("10.0.0.1", 7654), ("fd00::1", 7654)])
    pump(_session(a, books[0]), _session(b, books[1]))
    assert books[1].addresses(a.device) == [("10.0.0.1", 7654), ("fd00::1", 7654)]
    pump(_session(b, books[1]), _session(c, books[2]))  # a is not there: b passes it on
    assert books[2].addresses(a.device) == [("10.0.0.1", 7654), ("fd00::1", 7654)]
    assert b.catalog.addresses_of(a.device)[0][2] == "announce"


def test_a_new_announcement_is_relayed_at_once_over_open_sessions(tmp_path: Path) -> None:
    a, b, c = make_devices(tmp_path, 3)
    books = [_book(s) for s in (a, b, c)]
    b_to_c = _session(b, books[1])
    between_b_and_c = Links([(b_to_c, _session(c, books[2]))])
    between_b_and_c.run()
    assert books[2].addresses(a.device) == []
    books[0].announce([("10.0.0.7", 7654)])
    b_to_a = Session(b, "b", addresses=books[1], replicator=b_to_c.replicator)
    Links([(_session(a, books[0]), b_to_a)]).run()
    between_b_and_c.run()  # the session opened before a announced carries it
    assert books[2].addresses(a.device) == [("10.0.0.7", 7654)]


def test_loopback_is_announced_only_when_it_is_all_there_is(tmp_path: Path) -> None:
    (a,) = make_devices(tmp_path, 1)
    book = _book(a)
    both = [("192.168.1.5", 7654), ("127.0.0.1", 7654), ("::1", 7654)]
    assert book.announce(both).addresses == (("192.168.1.5", 7654),)
    alone = [("127.0.0.1", 7001)]
    assert book.announce(alone).addresses == (("127.0.0.1", 7001),)


def test_an_older_announcement_is_ignored_and_a_newer_one_wins(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    sync(a, b)  # b knows a as a member
    clock = Clock()
    book_a, book_b = _book(a, clock), _book(b, clock)
    old = book_a.announce([("10.0.0.1", 7654)])
    new = book_a.announce([("10.0.0.2", 7654)])
    session = syncing(_session(b, book_b))
    session.receive(Addresses([new.raw]))
    session.receive(Addresses([old.raw]))  # a replay of the older one
    assert book_b.announcements() == [new.raw]
    assert book_b.addresses(a.device)[0] == ("10.0.0.2", 7654)


def test_an_announcement_dated_far_ahead_is_ignored(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    sync(a, b)
    ahead = Announcement.make(a.key, a.share_id, Clock().now + 3600_000, [("10.0.0.1", 1)])
    now = Announcement.make(a.key, a.share_id, Clock().now, [("10.0.0.2", 1)])
    book = _book(b)
    session = syncing(_session(b, book))
    session.receive(Addresses([ahead.raw]))
    assert book.addresses(a.device) == []
    session.receive(Addresses([now.raw]))
    assert book.addresses(a.device) == [("10.0.0.2", 1)]


def test_a_non_members_announcement_is_ignored(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    sync(a, b)
    stranger = nacl.signing.SigningKey.generate()
    raw = Announcement.make(stranger, a.share_id, Clock().now, [("10.0.0.66", 7654)]).raw
    member = Announcement.make(a.key, a.share_id, Clock().now, [("10.0.0.1", 7654)]).raw
    book = _book(b)
    syncing(_session(b, book)).receive(Addresses([raw, member]))
    assert book.addresses(bytes(stranger.verify_key)) == [] and book.announcements() == [member]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("forged", "signature does not verify"),
        ("other share", "another share"),
        ("garbage", "bad address announcement"),
        ("too many", "too many address announcements"),
    ],
)
def test_a_bad_announcement_closes_the_session(tmp_path: Path, bad: str, reason: str) -> None:
    a, b = make_devices(tmp_path, 2)
    good = Announcement.make(a.key, a.share_id, Clock().now, [("10.0.0.1", 7654)]).raw
    raws = {
        "forged": [good[:-1] + bytes([good[-1] ^ 1])],
        "other share": [Announcement.make(a.key, bytes(16), Clock().now, [("10.0.0.1", 1)]).raw],
        "garbage": [b"BKA1" + bytes(10)],
        "too many": [good] * (MAX_ANNOUNCEMENTS + 1),
    }[bad]
    session = syncing(_session(b, _book(b)))
    with pytest.raises(ProtocolError, match=reason):
        session.receive(Addresses(raws))


def test_a_peer_that_connected_to_us_is_learned_at_its_ip_with_its_announced_port(
    tmp_path: Path,
) -> None:
    a, b = make_devices(tmp_path, 2)
    book_a, book_b = _book(a), _book(b)
    book_a.announce([("10.0.0.1", 7000), ("fd00::1", 7000)])
    inbound = _session(b, book_b, peer=a.device)
    inbound.remote_host = "192.168.1.20"  # what the socket says: maybe behind a NAT
    pump(_session(a, book_a, peer=b.device), inbound)
    assert ("192.168.1.20", 7000) in book_b.addresses(a.device)
    assert (
        dict(((h, p), s) for h, p, s, *_ in b.catalog.addresses_of(a.device))[
            ("192.168.1.20", 7000)
        ]
        == "inbound"
    )


# -- through the CLI ----------------------------------------------------------------------------


def _connected(device: Device) -> set[tuple[str, int]]:
    """The addresses ``device`` has reached a peer at."""
    with contextlib.closing(sqlite3.connect(device.root / ".backer" / "backer.db")) as db:
        return set(db.execute("SELECT host, port FROM addresses WHERE success_ms IS NOT NULL"))


def test_serve_announces_its_address_and_members_pass_it_on(tmp_path: Path) -> None:
    a = Device(tmp_path, "a")
    a.root.mkdir()
    a.run("init", str(a.root))
    port_a, port_b = free_port(), free_port()
    b, c = Device(tmp_path, "b"), Device(tmp_path, "c")
    tokens = [invite(a, f"127.0.0.1:{port_a}") for _ in range(2)]
    with a.serving(port_a):
        b.run("join", tokens[0], str(b.root))
        c.run("join", tokens[1], str(c.root))
    assert _connected(c) == {("127.0.0.1", port_a)}  # the address that worked
    with a.serving(port_a) as at_a:
        b.sync(at_a)  # b hears a's announcement
    with b.serving(port_b) as at_b:
        c.sync(at_b)  # c hears it from b, and b's own
    assert _connected(c) == {("127.0.0.1", port_a), ("127.0.0.1", port_b)}
    with contextlib.closing(sqlite3.connect(c.root / ".backer" / "backer.db")) as db:
        devices = {row[0] for row in db.execute("SELECT device FROM announcements")}
    assert len(devices) == 2  # a's, relayed by b, and b's own


def test_running_nodes_that_never_met_connect_through_a_member_that_met_both(
    tmp_path: Path,
) -> None:
    a, b, c = (Device(tmp_path, name) for name in "abc")
    a.root.mkdir()
    a.run("init", str(a.root))
    ports = {device: free_port() for device in (a, b, c)}
    with a.serving(ports[a]) as at_a:
        b.run("join", invite(a, at_a), str(b.root))
    with b.serving(ports[b]) as at_b:
        c.run("join", invite(b, at_b), str(c.root))
    with contextlib.closing(sqlite3.connect(c.root / ".backer" / "backer.db")) as db:
        db.execute("DELETE FROM addresses WHERE port != ?", (ports[b],))
        db.execute("DELETE FROM announcements")  # (b passed a's on at the join)
        db.commit()
    assert _connected(a) == set() and {p for _, p in _connected(c)} == {ports[b]}
    nodes = [device.start(ports[device]) for device in (a, b, c)]  # c knows b alone
    try:
        between = [f"(127.0.0.1:{ports[c]}, dialled)", f"(127.0.0.1:{ports[a]}, dialled)"]
        wait_until(lambda: between[0] in nodes[0].log or between[1] in nodes[2].log, nodes)
    finally:
        for node in nodes:
            node.stop()


@needs_netns
def test_an_invite_names_every_interface_address_not_only_the_host_names(
    tmp_path: Path,
) -> None:
    a = Device(tmp_path, "a")
    a.root.mkdir()
    a.run("init", str(a.root))
    with namespaces(2, "inv") as names:
        extra, extra6 = "10.232.77.5", "fd00:232::5"  # addresses no host name resolves to
        for family, address in (("-4", f"{extra}/24"), ("-6", f"{extra6}/64")):
            subprocess.run(
                in_ns(names[0], "ip", family, "addr", "add", address, "dev", "lo"), check=True
            )
        tokens = []
        for listen in ("0.0.0.0:7654", "[::]:7654"):
            args = ("invite", "--no-wait", "--listen", listen, "--dir", str(a.root))
            made = subprocess.run(
                in_ns(names[0], *a.command(*args)),
                env=a.env,
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            )
            assert "warning" not in made.stderr
            tokens.append(InviteToken.decode(made.stdout.strip()).addresses)
    ipv4, ipv6 = tokens
    assert f"{subnet_of(names)}.1:7654" in ipv4 and f"{extra}:7654" in ipv4
    assert ipv4[-1] == "127.0.0.1:7654" and not any("[" in a for a in ipv4)
    assert f"[{extra6}]:7654" in ipv6 and ipv6[-1] == "[::1]:7654"
    assert not any("." in a for a in ipv6)


@needs_netns
def test_an_invite_says_so_when_only_loopback_is_available(tmp_path: Path) -> None:
    a = Device(tmp_path, "a")
    a.root.mkdir()
    a.run("init", str(a.root))
    with namespaces(1, "lo") as names:
        args = ("invite", "--no-wait", "--dir", str(a.root))
        made = subprocess.run(
            in_ns(names[0], *a.command(*args)),
            env=a.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
    assert "only 127.0.0.1:7654" in made.stderr and "only this machine" in made.stderr
