"""A running node keeps every share served through what happens to it: a share whose
runtime failed is restarted; 'init', 'join' and 'forget' take effect without a
restart; what its libraries warn of is a line of its log."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from backer.connections import control
from backer.fs.paths import METADATA_DIR
from backer.model.share import DB_FILE
from tests.e2e import Device, Node, free_port, joined_pair, wait_until

LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) .*\n")


def test_a_share_whose_runtime_failed_is_restarted_with_backoff_and_status_says_why(
    tmp_path: Path,
) -> None:
    """Another process held the share's database past SQLite's 5 s wait, so the scan of
    a new file failed: the share was dropped (logged once), and nothing replicated
    until the node was restarted."""
    a, b, (a_port, b_port) = joined_pair(tmp_path)
    a_node, b_node = a.start(a_port), b.start(b_port)
    nodes = [a_node, b_node]
    try:
        (a.root / "before.txt").write_text("before\n")
        wait_until(lambda: (b.root / "before.txt").exists(), nodes)
        database = a.root / METADATA_DIR / DB_FILE
        with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as holder:
            holder.execute("BEGIN EXCLUSIVE")
            (a.root / "during.txt").write_text("written while the database is held\n")
            a_node.wait_for("a: stopped: OperationalError: database is locked; retry in 2 s")
            shown = a.run("status", "--dir", str(a.root)).stdout
            said = re.search(
                r"error: stopped: OperationalError: database is locked, retry in", shown
            )
            assert said, shown + a_node.log
            holder.execute("ROLLBACK")
        a_node.wait_for("a: restarted")
        wait_until(lambda: (b.root / "during.txt").exists(), nodes)
        (a.root / "after.txt").write_text("after\n")
        wait_until(lambda: (b.root / "after.txt").exists(), nodes)
        assert "no longer served" not in a_node.log
    finally:
        a_node.stop()
        b_node.stop()


def test_R35_a_failed_runtime_logs_where_it_failed_at_debug_level(tmp_path: Path) -> None:
    """'stopped: RecursionError: ...' named no file: the traceback is logged at debug."""
    device = Device(tmp_path, "a")
    device.root.mkdir()
    device.run("init", str(device.root))
    node = device.start()
    try:
        database = device.root / METADATA_DIR / DB_FILE
        with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as holder:
            holder.execute("BEGIN EXCLUSIVE")
            (device.root / "during.txt").write_text("written while the database is held\n")
            node.wait_for("a: stopped: OperationalError")
            holder.execute("ROLLBACK")
        node.wait_for("a: restarted")
        where = re.search(r"a: it failed in (\S+/backer/\S+\.py):\d+ in \w+", node.log)
        assert where and Path(where.group(1)).is_file(), node.log
    finally:
        node.stop()


def test_init_and_forget_while_the_node_runs_take_effect_within_seconds(tmp_path: Path) -> None:
    """The node read the registry once, at start: a share made by 'init' was not served
    and a forgotten one still was, until the node was restarted."""
    device = Device(tmp_path, "a")
    device.root.mkdir()
    device.run("init", str(device.root))
    node = device.start()
    try:
        later = tmp_path / "later"
        later.mkdir()
        (later / "first.txt").write_text("recorded by init\n")
        device.run("init", str(later))
        node.wait_for("later: watching")  # (served once 'init' let it go)
        (later / "second.txt").write_text("recorded by the node\n")
        node.wait_for("later: recorded 1 changes")
        assert control.answering(later)

        device.run("forget", str(device.root))
        node.wait_for("a: no longer registered: not served")
        wait_until(lambda: not control.answering(device.root), [node])
        alone = device.run("scan", "--dir", str(device.root))  # no longer "in use"
        assert "scanned in" in alone.stdout
        assert control.answering(later)
    finally:
        node.stop()
    assert node.process.returncode == 0


def test_watchdog_warnings_are_log_lines_and_a_folder_tree_made_at_once_warns_nothing(
    tmp_path: Path,
) -> None:
    """watchdog warned (Python's two raw lines on stderr, no time or level) for every
    directory of a tree made at once, hundreds of lines in a busy node's log."""
    device = Device(tmp_path, "a")
    device.root.mkdir()
    device.run("init", str(device.root))
    node = device.start()
    try:
        for tree in range(5):
            deep = device.root.joinpath(f"t{tree}", *(f"d{n}" for n in range(30)))
            deep.mkdir(parents=True)
            (deep / "leaf.txt").write_text("leaf\n")
        wait_until(lambda: all(_recorded(device, tree) for tree in range(5)), [node])
    finally:
        node.stop()
    assert "Warning" not in node.log, node.log
    assert all(LOG_LINE.fullmatch(line) for line in node.lines), node.log


def _recorded(device: Device, tree: int) -> bool:
    leaf = "/".join([f"t{tree}", *(f"d{n}" for n in range(30)), "leaf.txt"])
    shown = device.run("history", str(device.root / leaf), "--dir", str(device.root), check=False)
    return shown.returncode == 0


LIMITED_RUN = """
import os, sys
from pathlib import Path
Path("/proc/sys/user/max_inotify_watches").write_text("8")
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_the_watch_limit_is_one_warning_naming_the_sysctl_among_log_lines(
    tmp_path: Path,
) -> None:
    """In a user namespace of its own (so no other process is affected), the node's
    inotify watch limit is below the share's 111 directories."""
    probe = subprocess.run(["unshare", "-U", "-r", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no user namespaces here")
    device = Device(tmp_path, "a")
    for d in range(10):
        for e in range(10):
            (device.root / f"d{d}" / f"e{e}").mkdir(parents=True)
    device.run("init", str(device.root))
    wrap = ("unshare", "-U", "-r", sys.executable, "-c", LIMITED_RUN)
    node = Node(device, free_port(), {}, wrap=wrap)
    try:
        node.wait_for("watching")
        (device.root / "d9" / "e9" / "new.txt").write_text("polled\n")
        node.wait_for("a: recorded ")
        (device.root / "top.txt").write_text("watched\n")
        node.wait_for("a: recorded ", count=2)
    finally:
        node.stop()
    limit = [line for line in node.lines if "max_user_watches" in line]
    assert len(limit) == 1 and " WARNING " in limit[0], node.log
    assert all(LOG_LINE.fullmatch(line) for line in node.lines), node.log
