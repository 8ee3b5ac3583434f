"""Several peers at once through the real CLI: a device fetching from two, and invites
made while ``serve`` holds the share."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from backer.protocol.invite import MAX_EXPIRES_S, InviteToken
from tests.e2e import Device, free_port, invite, snapshot, summary_number


def _founder(tmp_path: Path) -> tuple[Device, int]:
    a = Device(tmp_path, "a")
    a.root.mkdir()
    (a.root / "big.bin").write_bytes(os.urandom(8 * 1024 * 1024))
    a.run("init", str(a.root))
    return a, free_port()


def test_sync_with_two_peers_fetches_from_both(tmp_path: Path) -> None:
    a, port = _founder(tmp_path)
    b, c = Device(tmp_path, "b"), Device(tmp_path, "c")
    tokens = [invite(a, f"127.0.0.1:{port}") for _ in range(2)]
    with a.serving(port) as at_a:
        b.run("join", tokens[0], str(b.root))
        c.run("join", tokens[1], str(c.root))
        (a.root / "second.bin").write_bytes(os.urandom(8 * 1024 * 1024))
        b.sync(at_a)
        with b.serving() as at_b:
            output = c.run("sync", at_a, at_b, "--dir", str(c.root)).stdout
    lines = output.strip().splitlines()
    assert len(lines) == 3, output
    per_peer = [summary_number(line, "chunk bytes received") for line in lines[1:]]
    assert min(per_peer) > 1024 * 1024, output
    assert sum(per_peer) == summary_number(lines[0], "chunk bytes received")
    assert snapshot(c.root) == snapshot(a.root) == snapshot(b.root)


def test_invites_while_serve_holds_the_share(tmp_path: Path) -> None:
    a, port = _founder(tmp_path)
    b, c = Device(tmp_path, "b"), Device(tmp_path, "c")
    with a.serving(port) as at_a:
        no_wait = a.run("invite", "--no-wait", "--address", at_a, "--dir", str(a.root))
        b.run("join", no_wait.stdout.strip(), str(b.root))
        waiting = subprocess.Popen(
            a.command("invite", "--address", at_a, "--dir", str(a.root)),
            env=a.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert waiting.stdout is not None
            token = waiting.stdout.readline().strip()
            c.run("join", token, str(c.root))
            _, said = waiting.communicate(timeout=30)
        finally:
            if waiting.poll() is None:
                waiting.kill()
                waiting.wait()
    assert waiting.returncode == 0 and "joined" in said, said
    assert snapshot(b.root) == snapshot(a.root) == snapshot(c.root)
    assert not (a.root / ".backer" / "control").exists()


def test_an_invite_needs_a_positive_lifetime(tmp_path: Path) -> None:
    a, _ = _founder(tmp_path)
    result = a.run("invite", "--no-wait", "--expires", "0", "--dir", str(a.root), check=False)
    assert result.returncode == 1
    expected = f"backer: error: --expires must be a number of seconds from 1 to {MAX_EXPIRES_S}"
    assert result.stderr.strip() == expected


def test_R30_an_invite_lifetime_beyond_the_bound_is_one_error_line_with_or_without_a_node(
    tmp_path: Path,
) -> None:
    """Its expiry (ms) did not fit the invite event's 64 bits: 'internal error' (exit 70)
    from the CLI, and through a running node no token, no message and exit status 0."""
    a, port = _founder(tmp_path)
    expected = f"backer: error: --expires must be a number of seconds from 1 to {MAX_EXPIRES_S}"
    args = ("invite", "--no-wait", "--expires", str(10**17), "--dir", str(a.root))
    alone = a.run(*args, check=False)
    assert (alone.returncode, alone.stderr.strip()) == (1, expected)
    with a.serving(port):
        served = a.run(*args, check=False)
        assert (served.returncode, served.stderr.strip(), served.stdout) == (1, expected, "")
        longest = a.run(*args[:3], str(MAX_EXPIRES_S), *args[4:])
        assert InviteToken.decode(longest.stdout.strip().splitlines()[-1])


def test_a_joiners_older_file_never_beats_the_shares_newer_one(tmp_path: Path) -> None:
    a, port = _founder(tmp_path)
    (a.root / "report.txt").write_text("the share's newer report")
    a.run("scan", "--dir", str(a.root))
    b = Device(tmp_path, "b")
    b.root.mkdir()
    (b.root / "report.txt").write_text("an old copy on the joiner")
    os.utime(b.root / "report.txt", ns=(1_600_000_000_000_000_000,) * 2)
    token = invite(a, f"127.0.0.1:{port}")
    with a.serving(port) as at_a:
        b.run("join", token, str(b.root))
        b.sync(at_a)
    for device in (a, b):
        files = snapshot(device.root)
        assert files["report.txt"][1] == b"the share's newer report"
        copies = [p for p in files if p.startswith("report.sync-conflict-")]
        assert len(copies) == 1 and files[copies[0]][1] == b"an old copy on the joiner"
