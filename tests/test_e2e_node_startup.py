"""The node's start-up (real ``backer run`` processes): what it does before it says
"watching" and what it leaves until after."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.e2e import Device, keep_nothing_replaced


def _save(path: Path, data: bytes) -> None:
    """Save as an editor does: a new file renamed over the old one."""
    new = path.with_name(path.name + ".saving")
    new.write_bytes(data)
    new.replace(path)


def _line(log: str, text: str) -> int:
    """The index of the first log line holding ``text``."""
    return next(i for i, line in enumerate(log.splitlines()) if text in line)


def test_the_retention_policy_is_applied_after_the_start_up_scan_not_before(
    tmp_path: Path,
) -> None:
    """The prune at start read every recorded version in the event loop before the
    start-up scan began (about half the CPU of a start on 100,000 files): it now waits
    until the node watches, and still runs then."""
    a = Device(tmp_path, "a")
    a.root.mkdir()
    for i in range(4):
        (a.root / f"doc-{i}.bin").write_bytes(os.urandom(5000))
    a.run("init", str(a.root))
    for i in range(4):
        _save(a.root / f"doc-{i}.bin", os.urandom(5000))
    a.run("scan", "--dir", str(a.root))
    keep_nothing_replaced(a)
    node = a.start()
    node.wait_for("pruned the kept contents of 4 versions")
    node.stop()
    assert _line(node.log, ": watching ") < _line(node.log, "pruned the kept contents")


def test_the_database_is_checked_at_start_after_a_kill_not_after_a_clean_stop(
    tmp_path: Path,
) -> None:
    """A start after SIGTERM skips `PRAGMA quick_check` (0.9 s on 100,000 files);
    one after SIGKILL still runs it, whatever the kill interrupted."""
    checked = "share database checked: it was not closed cleanly"
    a = Device(tmp_path, "a")
    a.root.mkdir()
    (a.root / "doc.txt").write_text("one")
    a.run("init", str(a.root))
    first = a.start()
    assert first.stop() == 0
    assert checked not in first.log  # ('init' closed it cleanly too)
    second = a.start()
    (a.root / "doc.txt").write_text("two")
    second.wait_for("recorded 1 changes")
    second.stop(signal.SIGKILL)
    assert checked not in second.log
    third = a.start()
    assert third.stop() == 0
    assert checked in third.log
    assert checked not in a.start().log
    a.nodes[-1].stop()
