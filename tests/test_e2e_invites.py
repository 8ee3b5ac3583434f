"""Invites through the real CLI: single use under a race, the inviter checked by the
joiner, interrupted joins, tokens kept out of ``ps``, and the control channel."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import nacl.signing
import pytest

from backer.config import registry
from backer.connections import transport
from backer.model.membership import EventKind, genesis_payload, invite_payload
from backer.model.share import Share
from backer.protocol.channel import MODE_JOIN, SecureChannel
from backer.protocol.invite import InviteToken
from backer.protocol.wire import Error, FrameReader, Welcome
from tests.e2e import Device, free_port, invite, snapshot


def _founder(tmp_path: Path, size: int = 1000) -> tuple[Device, int]:
    a = Device(tmp_path, "a")
    a.root.mkdir()
    (a.root / "data.bin").write_bytes(os.urandom(size))
    a.run("init", str(a.root))
    return a, free_port()


def _members(device: Device) -> int:
    with sqlite3.connect(device.root / ".backer" / "backer.db") as db:
        return db.execute("SELECT count(*) FROM members WHERE kept IS NULL").fetchone()[0]


async def _first_reply(channel: SecureChannel, reader: asyncio.StreamReader) -> object:
    """The first Welcome or Error the responder sends on an established channel."""
    frames = FrameReader()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        data = await asyncio.wait_for(reader.read(65536), 20)
        if not data:
            return None
        for message in frames.feed(channel.receive_data(data)):
            if isinstance(message, Welcome | Error):
                return message
    return None


def test_two_joiners_racing_on_one_token_only_one_is_admitted(tmp_path: Path) -> None:
    """Both handshakes are past the invite lookup before either completes: before the
    fix both were admitted."""
    a, port = _founder(tmp_path)
    token = InviteToken.decode(invite(a, f"127.0.0.1:{port}"))

    async def race() -> list[object]:
        joiners = [nacl.signing.SigningKey.generate() for _ in range(2)]
        channels = [
            SecureChannel(k, lambda *_: None, header=MODE_JOIN + token.invite_id, psk=token.psk)
            for k in joiners
        ]
        streams = [await transport.tcp_streams("127.0.0.1", port) for _ in joiners]
        for stream, channel in zip(streams, channels, strict=True):
            stream.writer.write(channel.data_to_send())  # header + first message
        for stream, channel in zip(streams, channels, strict=True):
            while not channel.established:
                channel.receive_data(await asyncio.wait_for(stream.reader.read(65536), 20))
        for stream, channel in zip(streams, channels, strict=True):
            stream.writer.write(channel.data_to_send())  # the last handshake message
        replies = [await _first_reply(c, s.reader) for s, c in zip(streams, channels, strict=True)]
        for stream in streams:
            stream.writer.close()
        return replies

    with a.serving(port):
        replies = asyncio.run(race())
    kinds = sorted(type(r).__name__ for r in replies)
    assert kinds == ["Error", "Welcome"], replies
    (error,) = [r for r in replies if isinstance(r, Error)]
    assert error.reason == b"this invite has already been used"
    assert _members(a) == 2


def test_two_concurrent_join_commands_with_one_token(tmp_path: Path) -> None:
    a, port = _founder(tmp_path)
    token = invite(a, f"127.0.0.1:{port}")
    b, c = Device(tmp_path, "b"), Device(tmp_path, "c")
    with a.serving(port):
        runs = [
            subprocess.Popen(
                d.command("join", "-", str(d.root)),
                env=d.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for d in (b, c)
        ]
        results = [run.communicate(token, timeout=120) for run in runs]
    codes = sorted(run.returncode for run in runs)
    assert codes == [0, 1], results
    (failed,) = [err for run, (_, err) in zip(runs, results, strict=True) if run.returncode]
    assert "this invite has already been used" in failed and len(failed.splitlines()) == 1
    assert _members(a) == 2


def _fake_share(tmp_path: Path, token: InviteToken) -> Device:
    """A share made by someone who only holds the token: same share id, its own genesis,
    and an invite with the token's id and key, signed by itself."""
    x = Device(tmp_path, "x")
    x.root.mkdir()
    (x.root / "bait.txt").write_text("upload here")
    key = nacl.signing.SigningKey.generate()
    x.home.mkdir()
    (x.home / "device.key").write_bytes(bytes(key))
    with Share.create(x.root, key, joining=(token.share_id, os.urandom(32))) as fake:
        fake._append(EventKind.GENESIS, genesis_payload(token.share_id, "fake"))
        far = int(time.time() * 1000) + 3_600_000
        fake._append(EventKind.INVITE, invite_payload(token.invite_id, token.psk, far))
        fake.scan()
    registry.register(token.share_id, x.root, x.home)  # what 'backer run' serves
    return x


def test_a_responder_that_knows_the_invite_key_but_is_not_the_inviter_is_refused(
    tmp_path: Path,
) -> None:
    a, port = _founder(tmp_path)
    token = InviteToken.decode(invite(a, f"127.0.0.1:{port}"))
    x = _fake_share(tmp_path, token)
    b = Device(tmp_path, "b")
    with x.serving() as at_x:
        redirected = dataclasses.replace(token, addresses=(at_x,)).encode()
        result = b.run("join", redirected, str(b.root), check=False)
    assert result.returncode == 1
    assert "the peer is not the inviter and shows no invite signed by it" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (b.root / "bait.txt").exists() and not (b.root / ".backer").exists()
    with a.serving(port):  # the token is still good at the real inviter
        b.run("join", token.encode(), str(b.root))
    assert snapshot(b.root) == snapshot(a.root)


def test_a_member_with_the_inviters_signed_invite_is_accepted(tmp_path: Path) -> None:
    """Not only the inviter: any member that has seen its invite may admit the joiner."""
    a, port = _founder(tmp_path)
    b, c = Device(tmp_path, "b"), Device(tmp_path, "c")
    first = invite(a, f"127.0.0.1:{port}")
    with a.serving(port) as at_a:
        b.run("join", first, str(b.root))
        second = InviteToken.decode(
            a.run("invite", "--no-wait", "--address", at_a, "--dir", str(a.root)).stdout.strip()
        )
        b.sync(at_a)  # b learns of the invite
    with b.serving() as at_b:
        c.run("join", dataclasses.replace(second, addresses=(at_b,)).encode(), str(c.root))
    assert snapshot(c.root) == snapshot(a.root)


def _made(device: Device) -> bool:
    """Whether a joiner's share database holds its share id (creation finished)."""
    try:
        with sqlite3.connect(device.root / ".backer" / "backer.db") as db:
            return db.execute("SELECT 1 FROM meta WHERE key = 'share_id'").fetchone() is not None
    except sqlite3.Error:
        return False


def test_an_interrupted_join_can_be_run_again_and_sync_says_what_to_do(
    tmp_path: Path,
) -> None:
    """A join killed before it got the share key left a share that 'join' called
    'already a share' and 'sync' failed on with an internal error."""
    a, port = _founder(tmp_path)
    token = invite(a, f"127.0.0.1:{port}")
    b = Device(tmp_path, "b")
    serve = a.start(port).process
    try:
        serve.send_signal(signal.SIGSTOP)  # the handshake cannot complete
        join = subprocess.Popen(b.command("join", token, str(b.root)), env=b.env)
        deadline = time.monotonic() + 120
        while not _made(b) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # connected, waiting for the stopped node
        join.kill()
        join.wait()
        serve.send_signal(signal.SIGCONT)
        half = b.run("sync", f"127.0.0.1:{port}", "--dir", str(b.root), check=False)
        assert half.returncode == 1
        assert half.stderr.strip().splitlines() == [
            "backer: error: this device has not finished joining the share: run 'backer "
            "join' again with the same token"
        ]
        b.run("join", token, str(b.root))
    finally:
        serve.send_signal(signal.SIGCONT)
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)
    assert snapshot(b.root) == snapshot(a.root)
    assert _members(a) == 2


def test_a_join_killed_after_admission_is_resumed_with_the_same_token(tmp_path: Path) -> None:
    a, port = _founder(tmp_path, size=48 * 1024 * 1024)
    token = invite(a, f"127.0.0.1:{port}")
    b = Device(tmp_path, "b")
    with a.serving(port):
        join = subprocess.Popen(b.command("join", token, str(b.root)), env=b.env)
        deadline = time.monotonic() + 60
        while _members(a) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        join.kill()
        join.wait()
        again = b.run("join", token, str(b.root), check=False)
        assert again.returncode == 0, again.stderr
    assert snapshot(b.root) == snapshot(a.root)
    assert _members(a) == 2  # the same device, admitted once


def test_the_token_can_come_from_stdin_or_a_file_and_stays_out_of_ps(tmp_path: Path) -> None:
    a, port = _founder(tmp_path)
    tokens = [invite(a, f"127.0.0.1:{port}") for _ in range(2)]
    b, c = Device(tmp_path, "b"), Device(tmp_path, "c")
    token_file = tmp_path / "token.txt"
    token_file.write_text(tokens[1] + "\n")
    with a.serving(port):
        from_stdin = subprocess.run(
            b.command("join", "-", str(b.root)),
            env=b.env,
            input=tokens[0],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert from_stdin.returncode == 0, from_stdin.stderr
        c.run("join", "--token-file", str(token_file), str(c.root))
    assert snapshot(b.root) == snapshot(c.root) == snapshot(a.root)
    help_text = b.run("join", "--help").stdout
    assert "--token-file" in help_text and "ps" in help_text
    missing = b.run("join", "--token-file", str(tmp_path / "nope"), str(b.root), check=False)
    assert missing.returncode == 1 and "cannot read the token file" in missing.stderr


def _hold_lock(root: Path):
    import fcntl

    handle = open(root / ".backer" / "lock", "ab")  # noqa: SIM115
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


def _impostor(port_holder: socket.socket) -> threading.Thread:
    """A local process that took the port: it answers any request with its own token."""

    def answer() -> None:
        connection, _ = port_holder.accept()
        with connection, connection.makefile("rwb") as stream:
            stream.write(b'{"challenge": "00"}\n')
            stream.flush()
            stream.readline()
            stream.write(b'{"proof": "00"}\n{"token": "IMPOSTOR-TOKEN"}\n')
            stream.flush()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    return thread


def test_the_control_channel_ignores_a_server_that_does_not_know_the_secret(
    tmp_path: Path,
) -> None:
    a, _ = _founder(tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as holder:
        control = {"port": holder.getsockname()[1], "secret": "ab" * 32, "pid": os.getpid()}
        (a.root / ".backer" / "control").write_text(json.dumps(control))
        lock = _hold_lock(a.root)
        try:
            thread = _impostor(holder)
            result = a.run("invite", "--no-wait", "--dir", str(a.root), check=False)
            thread.join(10)
        finally:
            lock.close()
    assert result.returncode == 1 and "IMPOSTOR-TOKEN" not in result.stdout
    assert "does not know its control secret" in result.stderr


def test_a_stale_control_file_of_a_killed_serve_is_removed(tmp_path: Path) -> None:
    a, _ = _founder(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    with socket.create_server(("127.0.0.1", 0)) as holder:
        control = {"port": holder.getsockname()[1], "secret": "ab" * 32, "pid": dead.pid}
        (a.root / ".backer" / "control").write_text(json.dumps(control))
        lock = _hold_lock(a.root)
        try:
            result = a.run("invite", "--no-wait", "--dir", str(a.root), check=False)
        finally:
            lock.close()
    assert result.returncode == 1 and "takes no requests" in result.stderr
    assert not (a.root / ".backer" / "control").exists()


def test_control_tmp_is_never_written_through_a_link(tmp_path: Path) -> None:
    a, port = _founder(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (a.root / ".backer" / "control.tmp").symlink_to(victim)
    with a.serving(port) as at_a:
        token = a.run("invite", "--no-wait", "--address", at_a, "--dir", str(a.root))
        assert token.returncode == 0 and token.stdout.strip()
    assert victim.read_text() == "keep me"


def test_a_join_killed_while_making_its_database_says_to_join_again(tmp_path: Path) -> None:
    """A join killed as its database was being made (tables begun, no share id yet):
    every command said 'damaged, run repair', repair could not tell the share, and
    join said 'already a share'."""
    a, port = _founder(tmp_path)
    token = invite(a, f"127.0.0.1:{port}")
    b = Device(tmp_path, "b")
    (b.root / ".backer").mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(b.root / ".backer" / "backer.db")) as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB)")
        db.execute("CREATE TABLE live (path TEXT, vid TEXT)")
        db.commit()
    for command in (("status",), ("sync", f"127.0.0.1:{port}"), ("repair", "--token", token)):
        result = b.run(*command, "--dir", str(b.root), check=False)
        assert result.returncode == 1, (command, result.stderr)
        assert "was never finished (an interrupted 'join' or 'init')" in result.stderr
        assert "run 'backer join' again with the same token" in result.stderr
    with a.serving(port):
        b.run("join", token, str(b.root))
    assert snapshot(b.root) == snapshot(a.root)


def _left_by_a_killed_init(root: Path, state: str) -> None:
    """What a kill -9 during ``init`` leaves, at three moments of making the database."""
    metadata = root / ".backer"
    metadata.mkdir()
    if state == "empty database file":
        (metadata / "backer.db").touch()
    elif state == "tables, no share id":
        with contextlib.closing(sqlite3.connect(metadata / "backer.db")) as db:
            db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB)")
            db.commit()
        (metadata / "lock").touch()


@pytest.mark.parametrize("state", ["no database", "empty database file", "tables, no share id"])
def test_R23_an_init_killed_before_its_share_had_an_id_is_made_again_by_init(
    tmp_path: Path, state: str
) -> None:
    """init said 'already a share', status said 'damaged, run repair' (with no peer to
    repair from) or 'run init again', and run served nothing: only deleting .backer/ by
    hand got out."""
    device = Device(tmp_path, "a")
    device.root.mkdir()
    (device.root / "notes.txt").write_text("mine")
    _left_by_a_killed_init(device.root, state)
    result = device.run("status", "--dir", str(device.root), check=False)
    assert result.returncode == 1
    assert "was never finished (an interrupted 'join' or 'init')" in result.stderr
    assert "'backer init' again" in result.stderr
    assert "initialised share" in device.run("init", str(device.root)).stdout
    status = device.run("status", "--dir", str(device.root)).stdout
    assert "1 files" in status or "1 file" in status, status
    assert (device.root / "notes.txt").read_text() == "mine"


def test_R23_a_real_share_is_never_taken_for_a_killed_init(tmp_path: Path) -> None:
    """A .backer/ holding more than a database (a content store, a snapshot) or a share
    this device remembers is not made again: it is damaged, and repair is the way."""
    device = Device(tmp_path, "a")
    device.root.mkdir()
    device.run("init", str(device.root))
    (device.root / ".backer" / "backer.db").unlink()
    result = device.run("init", str(device.root), check=False)
    assert result.returncode == 1 and "already a share" in result.stderr
    result = device.run("status", "--dir", str(device.root), check=False)
    assert result.returncode == 1 and "damaged" in result.stderr
