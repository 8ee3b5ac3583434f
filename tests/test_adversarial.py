"""Hostile peers: tampering, forgery, outsiders, garbage, and paths that try to escape."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from pathlib import Path

import nacl.signing
import pytest

from backer.connections import transport
from backer.model.membership import EventKind
from backer.model.records import Kind, Version, new_version_id
from backer.model.share import Share
from backer.protocol.channel import FAILED, UNKNOWN, refusal
from backer.protocol.session import Session
from backer.protocol.wire import MAX_FRAME, Events, FrameReader, ProtocolError
from tests.e2e import Device, free_port, invite, snapshot
from tests.helpers import make_devices, pump, sync, syncing


def test_a_tampered_event_is_rejected_and_nothing_of_it_stored(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    (a.root / "f.txt").write_text("x")
    a.scan()
    author = a.device
    raws = [e.raw for e in a.journal.events(author)]
    checkpoint = a.journal.summary()[author]
    tampered = bytearray(raws[-1])
    tampered[-70] ^= 1
    session = syncing(Session(b, "b"))
    with pytest.raises(ProtocolError, match="rejected events"):
        session.receive(Events(checkpoint.encode(), [*raws[:-1], bytes(tampered)], 0))
    assert b.journal.count() == 0


def test_events_forged_by_a_non_member_are_rejected(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    sync(a, b)
    outsider_root = tmp_path / "outsider"
    outsider_root.mkdir()
    outsider = Share.create(
        outsider_root, nacl.signing.SigningKey.generate(), joining=(a.share_id, a.share_key)
    )
    update, _ = outsider.state.write([("evil.txt", new_version_id(), Version(Kind.FILE, size=1))])
    (event,) = outsider.journal.append(outsider.key, [(EventKind.STATE, update)])
    checkpoint = outsider.journal.summary()[outsider.device]
    before = b.journal.count()
    with pytest.raises(ProtocolError, match="not a member"):
        syncing(Session(b, "b")).receive(Events(checkpoint.encode(), [event.raw], 0))
    assert b.journal.count() == before and not (b.root / "evil.txt").exists()


@pytest.mark.parametrize(
    "bad",
    [
        "../escape.txt",
        "/etc/backer-owned",
        "a/../../up",
        ".backer/backer.db",
        "nul\0byte",
        "\u00e9" * 150 + ".txt",  # R18: a 304-byte name no filesystem holds
        "/".join(f"d{n:03}" for n in range(900)) + "/f.txt",  # R18: 4,506 bytes deep
    ],
)
def test_a_member_naming_bad_paths_gets_nothing_written(tmp_path: Path, bad: str) -> None:
    a, b = make_devices(tmp_path, 2)
    (a.root / "good.txt").write_text("fine")
    a.scan()
    sync(a, b)
    version = Version(Kind.FILE, size=4, content=b"\0" * 32, device=a.device[:8], time_ms=1)
    update, _ = a.state.write([(bad, new_version_id(), version)])
    a._append(EventKind.STATE, update)
    stored = b.journal.count()
    with pytest.raises(ProtocolError, match="bad entry"):  # refused before it is stored
        pump(Session(a, "a"), Session(b, "b"))
    assert b.journal.count() == stored
    assert sorted(snapshot(b.root)) == ["good.txt"]
    assert not (tmp_path / "escape.txt").exists() and not Path("/etc/backer-owned").exists()
    assert all(path != bad for path, _, _ in b.catalog.all_live())


def test_a_symlinked_parent_is_never_followed_when_writing(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    (a.root / "dir").mkdir()
    sync(a, b)
    (a.root / "dir" / "f.txt").write_text("payload")
    outside = tmp_path / "outside"
    outside.mkdir()
    (b.root / "dir").rmdir()
    os.symlink(outside, b.root / "dir")  # a local, unscanned swap of the directory for a link
    a.scan()
    right = Session(b, "b")
    pump(Session(a, "a"), right)
    assert list(outside.iterdir()) == []
    # (a's dir got a new mtime with the entry: that version is left to b's scan as well)
    assert right.replicator.reports[-1].kept_local_edits == ["dir", "dir/f.txt"]


def test_oversized_and_unknown_frames_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="outside the allowed"):
        list(FrameReader().feed(struct.pack(">I", MAX_FRAME + 1)))
    with pytest.raises(ProtocolError, match="unknown message type"):
        list(FrameReader().feed(struct.pack(">I", 1) + b"\xee"))
    with pytest.raises(ProtocolError, match="truncated"):
        list(FrameReader().feed(struct.pack(">I", 3) + b"\x03\x00\x00"))


def _raw_exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(payload)
        connection.shutdown(socket.SHUT_WR)
        chunks = []
        while data := connection.recv(65536):
            chunks.append(data)
        return b"".join(chunks)


def test_serve_drops_garbage_wrong_keys_and_outsiders_and_keeps_serving(tmp_path: Path) -> None:
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    a.root.mkdir()
    (a.root / "f.txt").write_text("shared")
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    share_id = bytes.fromhex(
        a.run("status", "--json", "--dir", str(a.root)).stdout.split('"share_id": "')[1][:32]
    )
    with a.serving(port) as address:
        # garbage: not even a header we know; told so with a reason code, nothing more
        assert _raw_exchange(port, os.urandom(5000)) == refusal(UNKNOWN)
        # the right share id but the wrong share key: refused at the first message
        wrong_key = b"S" + share_id + b"\x00\x30" + os.urandom(48)
        assert _raw_exchange(port, wrong_key) == refusal(FAILED)
        # a device with the share key that is not a member
        outsider_root = tmp_path / "outsider"
        outsider_root.mkdir()
        a_key = nacl.signing.SigningKey(a.home.joinpath("device.key").read_bytes())
        with Share.open(a.root, a_key, exclusive=False) as founder:
            share_key = founder.share_key
        outsider = Share.create(
            outsider_root, nacl.signing.SigningKey.generate(), joining=(share_id, share_key)
        )

        async def attempt() -> None:
            streams = await transport.tcp_streams("127.0.0.1", port)
            channel = transport.SecureChannel(
                outsider.key,
                lambda peer, header, proof: None,
                header=b"S" + share_id,
                psk=share_key,
            )
            hub = transport.Hub(outsider, "x")
            await hub.run(streams, channel, hub.connect, True)

        with pytest.raises(transport.SessionClosed):
            asyncio.run(attempt())
        assert not (outsider_root / "f.txt").exists()
        # and a real member still gets served
        b.run("join", token, str(b.root))
        assert (b.root / "f.txt").read_text() == "shared"
        b.sync(address)
    log = a.serve_log
    assert log.count("closed session") >= 3
    assert "unknown share or invite" in log and "not a member" in log


def test_R18_a_path_too_long_here_is_reported_once_and_not_retried(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    sync(a, b)
    deep = "/".join(["d" * 200] * 20) + "/" + "f" * 40 + ".txt"  # too long under b's root
    assert len(deep) < 4096 < len(os.fsencode(b.root / deep))
    version = Version(Kind.DIRECTORY, permissions=0o755, device=a.device[:8], time_ms=1)
    update, _ = a.state.write([(deep, new_version_id(), version)])
    a._append(EventKind.STATE, update)
    right = Session(b, "b")
    pump(Session(a, "a"), right)
    assert [p.path for p in right.replicator.reports[-1].errors] == [deep]
    assert sorted(b.root.iterdir()) == [b.root / ".backer"]  # no folder made for it
    (a.root / "next.txt").write_text("later")  # any later change: a new plan on b
    a.scan()
    right = Session(b, "b")
    pump(Session(a, "a"), right)
    assert (b.root / "next.txt").read_text() == "later"
    assert all(not r.errors for r in right.replicator.reports)  # not tried again
    assert [p.path for _, p, _ in b.catalog.problems("apply")] == [deep]  # still reported
