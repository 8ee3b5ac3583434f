"""Progress when stderr is a log, not a terminal: plain lines with files, bytes, rate and
time left at most every BACKER_PROGRESS_INTERVAL seconds; none with --quiet or for runs
shorter than the interval. (Finding: progress was shown only on a terminal and only
in bytes.)"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backer.scanner.ignore import TEMP_PREFIX
from tests.e2e import Device, free_port, invite, joined_pair, slowed, snapshot, wait_until

LINE = re.compile(
    r"^backer: (\w+): (\d+)/(\d+) files, ([\d.]+)/([\d.]+) ([kMG]?B), (\S+ \S+|\?), (\S+) left$"
)
FILES, FILE_BYTES = 12, 300_000
# a received file counts once its chunks are written, and they go to the writer thread
# 4 MiB at a time (materializer.WRITE_BATCH): files larger than that show file by file
JOIN_FILE_BYTES = 1_500_000


def progress_lines(stderr: str, label: str) -> list[re.Match[str]]:
    return [m for m in map(LINE.match, stderr.splitlines()) if m and m.group(1) == label]


def device_with_files(tmp_path: Path, name: str = "a", size: int = FILE_BYTES) -> Device:
    device = Device(tmp_path, name)
    device.root.mkdir()
    for i in range(FILES):
        (device.root / f"file-{i}.bin").write_bytes(os.urandom(size))
    return device


def test_progress_is_logged_with_file_counts_and_bytes_when_not_a_terminal(
    tmp_path: Path,
) -> None:
    a = device_with_files(tmp_path, size=JOIN_FILE_BYTES)
    a.env["BACKER_PROGRESS_INTERVAL"] = "0"
    total = f"{FILES * JOIN_FILE_BYTES / 1e6:.1f}"
    scanned = progress_lines(a.run("init", str(a.root)).stderr, "scanning")
    assert len(scanned) == FILES  # one per file hashed, each interval (0 s) apart
    last = scanned[-1]
    assert last.group(2, 3) == (str(FILES), str(FILES))
    assert last.group(4, 5, 6) == (total, total, "MB")
    assert [int(m.group(2)) for m in scanned] == list(range(1, FILES + 1))

    b = Device(tmp_path, "b")
    b.env["BACKER_PROGRESS_INTERVAL"] = "0"
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with a.serving(port) as address:
        joined = b.run("join", token, str(b.root)).stderr
        for i in range(3):  # a sync scans first: that shows as well
            (b.root / f"new-{i}.bin").write_bytes(os.urandom(FILE_BYTES))
        synced = b.run("sync", address, "--dir", str(b.root)).stderr
    rescanned = progress_lines(synced, "scanning")
    assert rescanned, synced  # (the files just received are hashed again: not settled yet)
    assert rescanned[-1].group(2) == rescanned[-1].group(3) and int(rescanned[-1].group(3)) >= 3
    assert rescanned[-1].group(4) == rescanned[-1].group(5)
    assert all(m.group(5) == "0.0" for m in progress_lines(synced, "receiving"))
    received = progress_lines(joined, "receiving")
    assert received, joined
    assert received[-1].group(2, 3) == (str(FILES), str(FILES))
    assert received[-1].group(4, 5, 6) == (total, total, "MB")
    done = [int(m.group(2)) for m in received]
    assert done == sorted(done) and any(0 < n < FILES for n in done)  # file by file
    moving = [m for m in received if float(m.group(4)) > 0]
    assert moving, joined  # once bytes have arrived, a rate and a time left (the first
    # such line said '?' and '-:--:--': rich estimates only from a second update on)
    assert all(m.group(7) != "?" and m.group(8) != "-:--:--" for m in moving), joined
    assert snapshot(b.root) == snapshot(a.root)


def test_quiet_prints_no_progress(tmp_path: Path) -> None:
    a = device_with_files(tmp_path)
    a.env["BACKER_PROGRESS_INTERVAL"] = "0"
    result = a.run("init", str(a.root), "--quiet")
    assert result.stderr == ""
    (a.root / "new.bin").write_bytes(os.urandom(FILE_BYTES))
    assert a.run("scan", "-q", "--dir", str(a.root)).stderr == ""


def test_a_run_shorter_than_the_interval_prints_no_progress(tmp_path: Path) -> None:
    a = device_with_files(tmp_path)
    assert "BACKER_PROGRESS_INTERVAL" not in a.env  # the default: 10 s
    result = a.run("init", str(a.root))
    assert result.stderr == ""
    a.env["BACKER_PROGRESS_INTERVAL"] = "60"
    (a.root / "new.bin").write_bytes(os.urandom(FILE_BYTES))
    assert a.run("scan", "--dir", str(a.root)).stderr == ""


def test_a_bad_progress_interval_is_a_one_line_error(tmp_path: Path) -> None:
    a = device_with_files(tmp_path)
    a.env["BACKER_PROGRESS_INTERVAL"] = "soon"
    a.run("init", str(a.root), "--quiet")
    result = a.run("scan", "--dir", str(a.root), check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "backer: error: BACKER_PROGRESS_INTERVAL must be a number of seconds, not 'soon'"
    ]


def test_help_lists_the_progress_interval_next_to_backer_home(tmp_path: Path) -> None:
    shown = Device(tmp_path, "a").run("--help").stdout
    assert "BACKER_HOME" in shown and "BACKER_PROGRESS_INTERVAL" in shown


def test_on_a_terminal_the_live_display_shows_files_and_bytes(tmp_path: Path) -> None:
    a = device_with_files(tmp_path)
    a.env.update(TERM="xterm", COLUMNS="120")
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            a.command("init", str(a.root)), env=a.env, stderr=terminal, stdout=subprocess.PIPE
        )
        os.close(terminal)
        shown, deadline = b"", time.monotonic() + 60
        with contextlib.suppress(OSError):  # EIO once the child has closed the terminal
            while time.monotonic() < deadline:
                if select.select([controller], [], [], 1)[0]:
                    if not (chunk := os.read(controller, 65536)):
                        break
                    shown += chunk
        assert process.wait(timeout=60) == 0
    finally:
        os.close(controller)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode(errors="replace"))
    assert "scanning" in text and f"/{FILES} files" in text, text
    assert not progress_lines(text, "scanning")  # live, not log lines


def _this_device(device: Device, which: str | None = None) -> dict[str, object]:
    """``device``'s status entry of itself (or of the device with id ``which``)."""
    report = json.loads(device.run("status", "--json", "--dir", str(device.root)).stdout)
    return next(d for d in report["devices"] if (d["id"] == which if which else d["this"]))


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_status_says_a_file_is_needed_until_its_slowed_local_copy_is_in_place(
    tmp_path: Path,
) -> None:
    """A file whose chunks b holds already is a local copy (slowed here: every read of
    b's node delayed), with nothing to wait for from the peer. While the copy runs, b
    still needs the file (it is not in place), by its own status and by what a's status
    says of it."""
    size = 48 * 1024 * 1024
    a, b, (port_a, port_b) = joined_pair(tmp_path)
    original = os.urandom(size)
    (a.root / "big.bin").write_bytes(original)
    node_a = a.start(port_a)
    try:
        node_b = b.start(port_b)
        b_id = _this_device(b)["id"]
        wait_until(lambda: (b.root / "big.bin").exists() and snapshot(b.root) == snapshot(a.root),
                   [node_a, node_b])  # fmt: skip

        def under_way() -> bool:
            return any(p.name.startswith(TEMP_PREFIX) for p in b.root.iterdir())

        # 5 s a MiB read: the copy outlasts the samples however slow the status commands
        # are (at load 20 three samples took longer than the 48 s of 1 s a read)
        with slowed(node_b, "preadv2", 5_000_000) as full_speed:
            (a.root / "copy.bin").write_bytes(original)  # every chunk of it is on b already
            needed = (1, size)
            copying = []
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and len(copying) < 3:
                if under_way():
                    sample = (_this_device(b), _this_device(a, b_id))
                    if under_way():  # (still: both were asked while the copy ran)
                        copying.append(sample)
                time.sleep(0.2)
            assert len(copying) == 3, "no local copy seen under way"
            for own, told in copying[1:]:  # (the first may precede b's plan's count)
                assert (own["need_files"], own["need_bytes"]) == needed, own
                assert not told["in_sync"], told
            told = copying[-1][1]  # (b tells a its need every 0.5 s)
            assert (told["need_files"], told["need_bytes"]) == needed, told
            full_speed()  # (the rest of the copy at full speed)
        wait_until(lambda: snapshot(b.root) == snapshot(a.root), [node_a, node_b], timeout=120)
        wait_until(lambda: _this_device(b)["need_files"] == 0, [node_b])
    finally:
        for node in [*a.nodes, *b.nodes]:
            node.stop()


class SmallWindows(Device):
    """A device that applies at most ``WINDOW`` files per window."""

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "tests.small_windows", str(WINDOW), *args]


WINDOW, WINDOWED_FILES, WINDOWED_BYTES = 10, 40, 30_000


def test_a_join_of_several_windows_counts_every_byte_to_come_from_its_first_line(
    tmp_path: Path,
) -> None:
    """The bytes to receive were those of the windows begun so far: a join of four
    windows showed its first window's bytes as the whole, and a time left of a quarter
    of the truth (a join of 12,000 files: '0/12000 files, 5.4/15.0 MB, 0:00:02 left'
    forty seconds before its end, of 36 MB)."""
    a = Device(tmp_path, "a")
    a.root.mkdir()
    for i in range(WINDOWED_FILES):
        (a.root / f"file-{i:02}.bin").write_bytes(os.urandom(WINDOWED_BYTES))
    a.run("init", str(a.root), "-q")
    b = SmallWindows(tmp_path, "b")
    b.env["BACKER_PROGRESS_INTERVAL"] = "0"
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with a.serving(port):
        joined = b.run("join", token, str(b.root)).stderr
    received = progress_lines(joined, "receiving")
    total = f"{WINDOWED_FILES * WINDOWED_BYTES / 1e6:.1f}"
    assert received and received[-1].group(4) == total, joined
    assert {m.group(5, 6) for m in received} == {(total, "MB")}, joined
