"""One-shot commands scan once, before dialing, never inside their event loop: a scan
there stalled every session, so a large share outlasted the peer's handshake deadline
(through the real CLI over TCP on 127.0.0.1)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from backer.scanner.walk import look
from tests.e2e import Device, forwarder, free_port, invite, join_through
from tests.helpers import timing


def recorded(device: Device, path: str) -> bool:
    found = device.run("history", str(device.root / path), "--dir", str(device.root), check=False)
    return found.returncode == 0


def test_a_one_shot_sync_scans_once_before_dialing_and_not_as_each_session_opens(
    tmp_path: Path,
) -> None:
    a, b, c = (Device(tmp_path, name) for name in "abc")
    a.root.mkdir()
    (a.root / "from-a.txt").write_text("a")
    a.run("init", str(a.root))
    join_through(a, [b, c], free_port(), introduce=True)
    (b.root / "before.txt").write_text("written before the sync")

    def write_late(name: str) -> Callable[[], None]:  # once the sync dials: after its scan
        return lambda: (b.root / name).write_text("written while the sync dials")

    with (
        a.serving() as a_address,
        c.serving() as c_address,
        forwarder(a_address, write_late("late-1.txt")) as via_a,
        forwarder(c_address, write_late("late-2.txt")) as via_c,
    ):
        synced = b.run("sync", via_a, via_c, "--dir", str(b.root))
    logs = synced.stdout + synced.stderr + a.serve_log + c.serve_log
    assert synced.stdout.count("from ") == 2, logs
    # Each session opening scanned again before: both late files were recorded and sent.
    assert (b.root / "late-1.txt").exists() and (b.root / "late-2.txt").exists()
    assert not recorded(b, "late-1.txt") and not recorded(b, "late-2.txt")
    assert recorded(b, "before.txt")
    b.run("scan", "--dir", str(b.root))  # the next scan records them
    assert recorded(b, "late-1.txt") and recorded(b, "late-2.txt")


@timing
def test_joining_into_a_large_folder_finishes_within_the_inviters_handshake_deadline(
    tmp_path: Path,
) -> None:
    """The joiner's scan of a folder it brings ran between the handshake's second and
    third message: with more files than the inviter's deadline allows, it refused the
    join as too slow. The deadline here is half of what that scan takes."""
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    a.root.mkdir()
    (a.root / "from-a.txt").write_text("a")
    a.run("init", str(a.root))
    for n in range(12_000):
        folder = b.root / f"d{n % 60}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{n}").write_bytes(n.to_bytes(4, "big") * 8)
    started = time.monotonic()
    look(b.root, lambda paths, subtrees: {})
    scan_s = time.monotonic() - started
    handshake_s = max(scan_s / 2, 0.5)
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with a.serving(port, BACKER_TIME_SCALE=str(handshake_s / 20)):
        joined = b.run("join", token, str(b.root), check=False)
    assert joined.returncode == 0, f"scan {scan_s:.1f} s:\n{joined.stderr}"
    assert (b.root / "from-a.txt").read_text() == "a"
    assert "too slow" not in a.serve_log and "handshake did not complete" not in a.serve_log
