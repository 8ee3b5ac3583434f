"""``backer run`` refusing to start: one line and exit status 1, on every Python 3.11
it may run on (real ``backer run`` processes)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import pytest

from tests.e2e import Device, Node, forwarder, free_port


def _interpreters() -> list[str]:
    """This interpreter, and the system's ``python3`` when it is another 3.11 (Debian
    12's 3.11.2 wraps an exception raised inside ``except*`` in a group, 3.11.4 not)."""
    found = [sys.executable]
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system and os.path.realpath(system) != os.path.realpath(sys.executable):
        minor = subprocess.run(
            [system, "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if minor == str(sys.version_info[:2]):
            found.append(system)
    return found


@pytest.mark.parametrize("python", _interpreters())
def test_a_taken_port_is_one_line_and_exit_1_not_an_internal_error(
    tmp_path: Path, python: str
) -> None:
    """A second device tried on one machine (README: BACKER_HOME) meets the first one's
    port: under Python 3.11.2 with the web UI on, ``run`` said "internal error:
    ExceptionGroup" and exited 70."""
    a = Device(tmp_path, "a")
    a.root.mkdir()
    a.run("init", "-q", str(a.root))
    source = str(Path(__file__).resolve().parent.parent)
    env = {**a.env, "PYTHONPATH": os.pathsep.join([source, sysconfig.get_path("purelib")])}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                python,
                "-m",
                "backer",
                "run",
                "--listen",
                f"127.0.0.1:{port}",
                "--api",
                f"127.0.0.1:{free_port()}",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        f"backer: error: cannot listen on 127.0.0.1:{port}: Address already in use "
        "(another 'backer run' or program holds it: --listen HOST:PORT picks another)"
    )


def test_a_stopping_node_dials_no_new_session(tmp_path: Path) -> None:
    """Ctrl-C hung up the sessions, and the hang-up woke the dial loop, which dialled the
    peer at its other address and opened a new session before the node stopped (then
    waited up to 2 s for its goodbye): the peer saw a device that was shutting down
    connect again. Every device reachable at two addresses (a LAN's and the token's)
    did that at each stop."""
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    a.root.mkdir()
    a.run("init", str(a.root))
    port = free_port()
    addresses = ("--address", f"127.0.0.1:{port}", "--address", f"127.0.0.2:{port}")
    token = a.run("invite", "--no-wait", *addresses, "--dir", str(a.root)).stdout.strip()
    first = Node(a, port, {}, listen=f"0.0.0.0:{port}")
    try:
        first.wait_for("watching")
        b.run("join", token, str(b.root))
        second = b.start()
        second.wait_for(" open (")
        assert second.stop(signal.SIGINT) == 0
    finally:
        first.stop()
    after = second.log.split(" INFO stopping", 1)[1]
    assert " open (" not in after, second.log


def test_a_sigint_the_parent_ignores_stays_ignored_and_sigterm_stops(tmp_path: Path) -> None:
    """A shell script's background job (``backer run &``) starts with SIGINT ignored, so
    that the terminal's Ctrl-C meant for the script leaves it running. The node ignored
    SIGINT while it started, then stopped on the first one once it watched: a Ctrl-C
    lost or obeyed by chance of timing. It now stays ignored; SIGTERM stops it."""
    a = Device(tmp_path, "a")
    a.root.mkdir()
    a.run("init", str(a.root))
    ignoring = ("sh", "-c", 'trap "" INT; exec "$@"', "sh")
    node = Node(a, free_port(), {}, wrap=ignoring)
    try:
        node.wait_for("watching")
        node.process.send_signal(signal.SIGINT)
        (a.root / "after.txt").write_text("recorded: the node runs on\n")
        node.wait_for("a: recorded 1 changes")
        assert node.process.poll() is None, node.log
    finally:
        assert node.stop(signal.SIGTERM) == 0, node.log


def test_an_interrupted_join_says_how_to_go_on(tmp_path: Path) -> None:
    """Ctrl-C during a join printed "aborted" and left .backer-*.tmp files in the
    folder unexplained: it now says that the same join goes on from them."""
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    a.root.mkdir()
    (a.root / "doc.bin").write_bytes(os.urandom(100_000))
    a.run("init", str(a.root))
    dialled = threading.Event()
    with (
        a.serving() as address,
        forwarder(address, on_accept=dialled.set, hold=(2, 30.0)) as slow,
    ):
        token = a.run("invite", "--no-wait", "--address", slow, "--dir", str(a.root))
        joining = subprocess.Popen(
            b.command("join", token.stdout.strip(), str(b.root)),
            env=b.env,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert dialled.wait(60), "the join never dialled"
        time.sleep(1)  # (its session under way: the forwarder holds what comes next)
        joining.send_signal(signal.SIGINT)
        _, stderr = joining.communicate(timeout=120)
    assert joining.returncode == 1, stderr
    assert stderr.strip().splitlines()[-1] == (
        "backer: error: join interrupted: run the same 'backer join' again to go on from "
        "what it received (the .backer-*.tmp files it left)"
    )
