"""A restore interrupted by a crash (SIGKILL of the node) is finished by the next start:
what the journal records as restored is on the disk, and no temp file stays."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.e2e import Device

FILES = 300


def _recorded(device: Device, folder: Path) -> int:
    """How many entries ``backer ls`` lists as recorded now in ``folder`` (0: none)."""
    listed = device.run("ls", str(folder), "--share", str(device.root), "--json", check=False)
    return len(json.loads(listed.stdout)) if listed.returncode == 0 else 0


def _contents(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (temp files included) by relative path."""
    if not folder.exists():
        return {}
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_R12_a_restore_killed_midway_is_finished_at_the_next_start(tmp_path: Path) -> None:
    device = Device(tmp_path, "a")
    folder = device.root / "stdlib"
    for i in range(FILES):
        sub = folder / f"d{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:03d}.py").write_bytes(os.urandom(2000 + i))
    wanted = _contents(folder)
    device.run("init", str(device.root))
    node = device.start()
    try:
        time.sleep(1.1)
        moment = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        time.sleep(1.1)
        for path in sorted(folder.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        folder.rmdir()
        deadline = time.monotonic() + 60
        while _recorded(device, folder) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _recorded(device, folder), "the deletions were not recorded"

        restore = device.command("restore", str(folder), "--at", moment)
        running = subprocess.Popen(
            restore,
            env=device.env,
            cwd=device.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while len(_contents(folder)) < 20 and time.monotonic() < deadline:
            time.sleep(0.005)
        node.stop(signal.SIGKILL)
        running.communicate(timeout=60)
        half = _contents(folder)
        assert len(half) >= 20 and half != wanted, "the kill did not come midway"

        node = device.start()  # "watching": its start-up work is done
        assert _contents(folder) == wanted
        assert _recorded(device, folder) == 10  # d0 ... d9
        assert "finished an interrupted restore" in node.log
    finally:
        node.stop()
