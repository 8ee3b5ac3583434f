"""The peer is told why it is refused, and the user reads it: one line, exit status 1."""

from __future__ import annotations

import dataclasses
import socket
import sys
import threading
from pathlib import Path

from backer.protocol.invite import InviteToken
from tests.e2e import Device, free_port, invite


def _founder(tmp_path: Path) -> tuple[Device, int]:
    a = Device(tmp_path, "a")
    a.root.mkdir()
    (a.root / "f.txt").write_text("shared")
    a.run("init", str(a.root))
    return a, free_port()


def _one_error_line(stderr: str, expected: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], stderr
    assert "internal error" not in stderr and "SessionClosed" not in stderr, stderr


def test_a_used_token_reads_already_used(tmp_path: Path) -> None:
    a, port = _founder(tmp_path)
    token = invite(a, f"127.0.0.1:{port}")
    b, c = Device(tmp_path, "b"), Device(tmp_path, "c")
    with a.serving(port):
        b.run("join", token, str(b.root))
        result = c.run("join", token, str(c.root), check=False)
    assert result.returncode == 1
    _one_error_line(result.stderr, "this invite has already been used")
    assert "this invite has already been used" in a.serve_log


def test_a_garbled_token_secret_reads_handshake_failed(tmp_path: Path) -> None:
    a, port = _founder(tmp_path)
    token = InviteToken.decode(invite(a, f"127.0.0.1:{port}"))
    garbled = dataclasses.replace(token, psk=bytes(32)).encode()
    b = Device(tmp_path, "b")
    with a.serving(port):
        result = b.run("join", garbled, str(b.root), check=False)
    assert result.returncode == 1
    _one_error_line(result.stderr, "the peer refused: the handshake failed")


def test_a_service_that_is_not_backer_is_named(tmp_path: Path) -> None:
    a, _ = _founder(tmp_path)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def banner() -> None:  # what an SSH server says first
        connection, _ = listener.accept()
        with connection:
            connection.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
            connection.recv(1024)

    thread = threading.Thread(target=banner, daemon=True)
    thread.start()
    result = a.run("sync", f"127.0.0.1:{port}", "--dir", str(a.root), check=False)
    thread.join(10)
    listener.close()
    assert result.returncode == 1
    _one_error_line(result.stderr, "the peer does not speak backer's protocol")


def test_a_wrong_stdio_command_reads_its_exit_status(tmp_path: Path) -> None:
    a, _ = _founder(tmp_path)
    wrong = f"{sys.executable} -m backer stdio {a.root}"  # DIR needs --dir
    result = a.run("sync", "--command", wrong, "--dir", str(a.root), check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()  # the child's usage error, then ours
    assert "the command exited with status 2" in lines[-1], result.stderr
    assert "internal error" not in result.stderr, result.stderr
