"""A device whose clock is stepped back (NTP correcting a clock that was ahead, here
across a reboot) goes on recording after what it already recorded, never before it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.e2e import Device

DAYS_AHEAD = 3


class SteppedClock(Device):
    """A device whose wall clock is ``offset_s`` seconds off; a test steps it."""

    offset_s = DAYS_AHEAD * 86400

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "tests.clock_offset", str(self.offset_s), *args]


def test_a_clock_stepped_back_records_the_next_edit_after_the_last(tmp_path: Path) -> None:
    """A device whose clock was three days ahead recorded a file; it rebooted with its
    clock set right, and the person edited the file. The edit was dated three days
    before the version it replaced: `history` showed the newer version as the older
    one, and a restore `--at` a moment between them brought back the wrong one."""
    device = SteppedClock(tmp_path, "a")
    device.root.mkdir()
    notes = device.root / "notes.txt"
    notes.write_bytes(b"draft")
    device.run("init", str(device.root), "-q")
    device.offset_s = 0  # the reboot: NTP set the clock right
    notes.write_bytes(b"the final text")
    device.run("scan", "--dir", str(device.root), "-q")
    shown = json.loads(device.run("history", str(notes), "--json").stdout)
    times = {entry["size"]: entry["time_ms"] for entry in shown}
    assert times[len(b"the final text")] >= times[len(b"draft")], shown
    log = json.loads(device.run("log", "--json", "--dir", str(device.root)).stdout)
    stamps = [entry["time"] for entry in sorted(log, key=lambda e: e["seq"])]
    assert stamps == sorted(stamps), stamps
