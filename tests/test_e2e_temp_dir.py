"""SQLite's scratch files stay out of a full system temp directory (R46)."""

from __future__ import annotations

from pathlib import Path

from tests.e2e import Device, free_port, invite
from tests.helpers import small_disk

FOLDER = "d" * 200
NAME = "f" * 150


def test_R46_a_scan_and_a_join_succeed_with_no_room_in_the_temp_directory(
    tmp_path: Path,
) -> None:
    """A thousand files of long names, scanned by init and joined by a second device,
    both with TMPDIR (and SQLITE_TMPDIR) on a 64 KiB tmpfs, as a full /tmp is: a
    statement journal past 64 KiB spilled there and the scan failed with 'database or
    disk is full' while the share's disk had room."""
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    for folder in range(10):
        (a.root / f"{FOLDER}{folder}").mkdir(parents=True)
        for n in range(100):
            (a.root / f"{FOLDER}{folder}" / f"{NAME}{n}").write_text(f"{folder}/{n}")
    port = free_port()
    with small_disk(tmp_path / "tmp", "64k") as full_tmp:
        for device in (a, b):
            device.env.update(TMPDIR=str(full_tmp), SQLITE_TMPDIR=str(full_tmp))
        scanned = a.run("init", "-q", str(a.root), check=False)
        assert scanned.returncode == 0, scanned.stderr
        token = invite(a, f"127.0.0.1:{port}")
        with a.serving(port):
            joined = b.run("join", "-q", token, str(b.root), check=False)
        assert joined.returncode == 0, joined.stderr
    received = sorted(p.read_text() for p in b.root.glob(f"{FOLDER}*/{NAME}*"))
    assert received == sorted(f"{f}/{n}" for f in range(10) for n in range(100))
