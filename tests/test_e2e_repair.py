"""A damaged or lost ``.backer/``: a clear message naming ``backer repair``, never an
internal error, and ``repair`` bringing the device back in place (real CLI processes)."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.e2e import Device


def _damaged(result: subprocess.CompletedProcess[str]) -> None:
    """One line on stderr naming the next step, exit status 1."""
    assert result.returncode == 1, result.stderr
    assert "backer repair" in result.stderr and "internal error" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.fixture
def device(tmp_path: Path) -> Device:
    a = Device(tmp_path, "a")
    a.root.mkdir()
    for i in range(12):
        (a.root / f"file-{i}.txt").write_bytes(os.urandom(3000))
    a.run("init", str(a.root))
    for i in range(5):
        (a.root / f"file-{i}.txt").write_text(f"edit {i}")
        a.run("scan", "--dir", str(a.root))
    return a


def _db(device: Device) -> Path:
    return device.root / ".backer" / "backer.db"


def _stored(device: Device, query: str) -> bytes:
    with sqlite3.connect(_db(device)) as conn:
        return conn.execute(query).fetchone()[0]


def _overwrite_inside(device: Device, needle: bytes) -> None:
    """Flip bytes in the middle of ``needle`` wherever it lies in the database file (a
    freed page may hold an older copy)."""
    data = bytearray(_db(device).read_bytes())
    at = data.find(needle)
    assert at >= 0
    while at >= 0:
        middle = at + len(needle) // 2
        data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
        at = data.find(needle, at + 1)
    _db(device).write_bytes(bytes(data))


@pytest.mark.parametrize("size", [0, 100, 8192, "half"])
def test_a_truncated_database_is_reported_with_repair_not_as_an_internal_error(
    device: Device, size: int | str
) -> None:
    db = _db(device)
    os.truncate(db, db.stat().st_size // 2 if size == "half" else size)
    for command in ("status", "scan", "sync"):
        _damaged(device.run(command, "--dir", str(device.root), check=False))


def test_a_damaged_document_snapshot_is_rebuilt_from_the_journal(device: Device) -> None:
    before = device.run("status", "--json", "--dir", str(device.root)).stdout
    _overwrite_inside(device, _stored(device, "SELECT value FROM meta WHERE key='doc_snapshot'"))
    assert device.run("status", "--json", "--dir", str(device.root)).stdout == before
    (device.root / "file-9.txt").write_text("an edit after the damage")
    assert "1 modified" in device.run("scan", "--dir", str(device.root)).stdout
    history = device.run(
        "history", str(device.root / "file-9.txt"), "--dir", str(device.root)
    ).stdout
    assert len(history.splitlines()) == 2


def test_damaged_bytes_in_a_journal_event_are_reported_with_repair(device: Device) -> None:
    _overwrite_inside(device, _stored(device, "SELECT raw FROM events ORDER BY rowid LIMIT 1"))
    _damaged(device.run("status", "--dir", str(device.root), check=False))


def test_damaged_bytes_anywhere_never_give_an_internal_error(device: Device) -> None:
    pristine = _db(device).read_bytes()
    rng = random.Random(7)
    for _ in range(12):
        data = bytearray(pristine)
        at = rng.randrange(100, len(data) - 32)
        data[at : at + 32] = rng.randbytes(32)
        _db(device).write_bytes(bytes(data))
        result = device.run("scan", "--dir", str(device.root), check=False)
        assert "internal error" not in result.stderr and "Traceback" not in result.stderr
        if result.returncode:
            _damaged(result)


def test_a_lost_metadata_directory_points_at_repair_not_init(device: Device) -> None:
    shutil.rmtree(device.root / ".backer")
    result = device.run("scan", "--dir", str(device.root), check=False)
    _damaged(result)
    assert "lost its .backer/" in result.stderr
    (device.root / ".backer").mkdir()  # the directory is back, its database is not
    _damaged(device.run("status", "--dir", str(device.root), check=False))
