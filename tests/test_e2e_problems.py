"""Per-file problems through the real CLI: path and reason, grouped, once, exit 3."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.e2e import Device, free_port, invite

# root, minus the powers that let it read and write anything (and chmod what it does not own)
NO_OVERRIDE = "--bounding-set=-dac_override,-dac_read_search,-fowner"


class Unprivileged(Device):
    """A device whose backer runs without root's power over file permissions."""

    def command(self, *args: str) -> list[str]:
        if os.geteuid() != 0:
            return super().command(*args)
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv")
        return [setpriv, NO_OVERRIDE, sys.executable, "-m", "backer", *args]


def status_problems(device: Device) -> list[dict]:
    out = device.run("status", "--json", "--dir", str(device.root)).stdout
    return json.loads(out)["problems"]


def test_unreadable_file_is_listed_with_its_reason_once_and_exit_3(tmp_path: Path) -> None:
    a = Unprivileged(tmp_path, "a")
    a.root.mkdir()
    (a.root / "ok.txt").write_text("fine")
    (a.root / "secret.txt").write_text("s")
    (a.root / "secret.txt").chmod(0)
    first = a.run("init", str(a.root), check=False)
    assert first.returncode == 3, first.stderr
    assert "error: secret.txt: cannot read: Permission denied" in first.stderr
    assert "1 files failed" in first.stdout
    again = a.run("scan", "--dir", str(a.root), check=False)
    assert again.returncode == 3
    assert "secret.txt" not in again.stderr  # shown once, not on every run
    assert "1 problems reported before remain" in again.stderr
    listed = a.run("scan", "--json", "--dir", str(a.root), check=False)
    assert json.loads(listed.stdout)["problems"] == [
        {"path": "secret.txt", "reason": "cannot read: Permission denied", "warning": False}
    ]
    assert [(p["path"], p["reason"]) for p in status_problems(a)] == [
        ("secret.txt", "cannot read: Permission denied")
    ]
    (a.root / "secret.txt").chmod(0o644)
    fixed = a.run("scan", "--dir", str(a.root))
    assert "1 added" in fixed.stdout and status_problems(a) == []


def test_files_that_cannot_be_written_are_grouped_by_reason_and_exit_3(tmp_path: Path) -> None:
    a, b = Unprivileged(tmp_path, "a"), Unprivileged(tmp_path, "b")
    (a.root / "docs").mkdir(parents=True)
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with a.serving(port) as address:
        b.run("join", token, str(b.root))
        os.chown(b.root / "docs", 65534, 65534)  # b may no longer write into it
        for n in range(12):
            (a.root / "docs" / f"{n:02}.txt").write_text(f"file {n}")
        failed = b.run("sync", address, "--dir", str(b.root), check=False)
        assert failed.returncode == 3, failed.stderr
        assert "errors 12" in failed.stdout
        lines = failed.stderr.splitlines()
        denied = ("error: Permission denied: 12 files", "error: Operation not permitted: 12 files")
        assert any(line in lines for line in denied), lines  # (EPERM: b may not chmod it)
        assert "    docs/00.txt" in lines and "    ... and 2 more" in lines
        assert len(status_problems(b)) == 12
        repeated = b.run("sync", address, "--dir", str(b.root), check=False)
        assert repeated.returncode == 3 and "docs/00.txt" not in repeated.stderr
        os.chown(b.root / "docs", 0, 0)
        b.run("sync", address, "--dir", str(b.root))
    assert (b.root / "docs" / "11.txt").read_text() == "file 11"
    assert status_problems(b) == []


def test_a_failed_file_deleted_elsewhere_is_no_longer_listed_and_serve_lists_once(
    tmp_path: Path,
) -> None:
    a, b = Unprivileged(tmp_path, "a"), Unprivileged(tmp_path, "b")
    (a.root / "docs").mkdir(parents=True)
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with a.serving(port) as address:
        b.run("join", token, str(b.root))
        os.chown(b.root / "docs", 65534, 65534)
        (a.root / "docs" / "draft.txt").write_text("never arrives")
        (a.root / "private.txt").write_text("a cannot read it")
        (a.root / "private.txt").chmod(0)
        assert b.run("sync", address, "--dir", str(b.root), check=False).returncode == 3
        assert [p["path"] for p in status_problems(b)] == ["docs/draft.txt"]
        (a.root / "docs" / "draft.txt").unlink()
        done = b.run("sync", address, "--dir", str(b.root))
        assert "errors 0" in done.stdout
    assert status_problems(b) == []
    assert a.serve_log.count("private.txt") == 1  # serve lists it once, not at every session
    assert "error: private.txt: cannot read: Permission denied" in a.serve_log
