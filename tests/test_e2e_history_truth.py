"""What ``history``, ``log`` and ``--at`` say about versions and times is true: bytes
nothing pruned are not called pruned, a time ahead of this device's clock is said to
be, and a moment in its future is refused rather than taken for "now"."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.e2e import Device

DAYS_AHEAD = 3


def test_history_calls_bytes_pruned_only_where_a_prune_dropped_them(tmp_path: Path) -> None:
    """A lone device's file overwritten in place before its next scan: the replaced
    version's bytes were never kept anywhere, and 'history' said they were "pruned on
    every device" (no prune had run)."""
    a = Device(tmp_path, "a")
    a.root.mkdir()
    (a.root / "notes.txt").write_bytes(b"first")
    a.run("init", str(a.root), "-q")
    (a.root / "notes.txt").write_bytes(b"second!")  # (in place: the old bytes are gone)
    a.run("scan", "--dir", str(a.root), "-q")
    replaced = a.run("history", str(a.root / "notes.txt")).stdout.splitlines()[0]
    assert "pruned" not in replaced, replaced
    assert "(bytes not here; no device holds them: no restore can bring them back)" in replaced


class SteppedClock(Device):
    """A device whose wall clock is ``offset_s`` seconds off; a test steps it."""

    offset_s = DAYS_AHEAD * 86400

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "tests.clock_offset", str(self.offset_s), *args]


def test_times_ahead_of_the_clock_are_said_and_a_moment_in_its_future_is_refused(
    tmp_path: Path,
) -> None:
    """A version recorded while the clock was three days ahead showed that future date
    as any other; '--at' and '--since' took any date, 2099 too, and a restore '--at'
    2099 silently restored "now"."""
    device = SteppedClock(tmp_path, "a")
    device.root.mkdir()
    notes = device.root / "notes.txt"
    notes.write_bytes(b"draft")
    device.run("init", str(device.root), "-q")
    device.offset_s = 0  # NTP set the clock right
    for command in ("history", "log"):
        shown = device.run(command, str(notes)).stdout
        assert "(ahead of this device's clock)" in shown, (command, shown)
    for args in (
        ("restore", str(notes), "--at", "2099-01-01"),
        ("ls", str(device.root), "--at", "2099-01-01 12:00"),
        ("log", "--since", "2099-01-01", "--dir", str(device.root)),
    ):
        refused = device.run(*args, check=False)
        assert refused.returncode == 1, (args, refused.stderr)
        line = refused.stderr.strip()
        assert "is in the future: it is " in line and "\n" not in line, (args, line)
    assert notes.read_bytes() == b"draft"
