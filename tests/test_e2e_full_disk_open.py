"""A share on a full filesystem: read-only commands say the disk is full."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e import Device


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_status_log_and_scan_on_a_full_disk_say_disk_full(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(disk)], check=True)
    try:
        device = Device(disk, "a")
        device.home = tmp_path / "a-home"
        device.env["BACKER_HOME"] = str(device.home)
        device.root.mkdir()
        (device.root / "notes.txt").write_text("hello")
        device.run("init", str(device.root))
        with open(disk / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
            for _ in range(64):  # 64 MiB: more than the 10 MiB disk holds
                filler.write(b"\0" * 1024 * 1024)
        for command in ("status", "log", "scan"):
            result = device.run(command, "--dir", str(device.root), check=False)
            assert result.returncode == 1, (command, result.stderr)
            assert result.stderr.startswith("backer: error: disk full:"), result.stderr
            assert len(result.stderr.strip().splitlines()) == 1
        (disk / "filler").unlink()
        assert "notes.txt" in device.run("log", "--dir", str(device.root)).stdout
    finally:
        subprocess.run(["umount", str(disk)], check=False)
