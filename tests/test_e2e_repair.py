"""A damaged or lost ``.backer/``: a clear message naming ``backer repair``, never an
internal error, and ``repair`` bringing the device back in place (real CLI processes)."""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.e2e import Device, free_port, invite, snapshot, summary_number


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
    moved = device.root.parent / "moved"  # a folder the home does not know by its path
    shutil.rmtree(device.root / ".backer")
    device.root.rename(moved)
    result = device.run("scan", "--dir", str(moved), check=False)
    assert result.returncode == 1 and "backer repair --token" in result.stderr
    empty = moved.parent / "empty"
    empty.mkdir()
    result = device.run("scan", "--dir", str(empty), check=False)
    assert "backer init" in result.stderr and "repair" not in result.stderr


# -- backer repair ------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path: Path):
    """a serving, b joined and in sync with it; b has recorded a file of its own."""
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    a.root.mkdir()
    (a.root / "docs").mkdir()
    for i in range(12):
        (a.root / "docs" / f"photo-{i}.bin").write_bytes(os.urandom(90_000))
    os.symlink("docs/photo-1.bin", a.root / "link")
    (a.root / "empty").mkdir()
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with a.serving(port) as address:
        b.run("join", token, str(b.root))
        (b.root / "from-b.txt").write_text("written on b")
        b.sync(address)
        yield a, b, address


def _events(device: Device) -> int:
    status = device.run("status", "--json", "--dir", str(device.root)).stdout
    return json.loads(status)["events"]


def _disk(root: Path) -> dict[str, tuple[int, int]]:
    """Inode and mtime of every entry outside .backer/."""
    return {
        p.relative_to(root).as_posix(): (p.lstat().st_ino, p.lstat().st_mtime_ns)
        for p in root.rglob("*")
        if ".backer" not in p.relative_to(root).parts
    }


def _repair(device: Device, *args: str) -> str:
    return device.run("repair", *args, "--dir", str(device.root)).stdout


def test_repair_after_losing_metadata_moves_no_bytes_and_records_no_version(pair) -> None:
    a, b, address = pair
    events = _events(a)
    disk = _disk(b.root)
    shutil.rmtree(b.root / ".backer")
    out = _repair(b, "--from", address)
    assert summary_number(out, "chunk bytes received") == 0
    assert summary_number(out, "events received") == events
    assert "recorded 0 added and 0 modified" in out
    assert _disk(b.root) == disk  # no file rewritten, not even touched
    for _ in range(2):
        assert summary_number(b.sync(address), "chunk bytes received") == 0
    assert _events(a) == events == _events(b)  # no new version anywhere
    assert snapshot(a.root) == snapshot(b.root)
    assert _disk(b.root) == disk
    (b.root / "from-b.txt").write_text("edited after the repair")  # b goes on as before
    b.sync(address)
    assert (a.root / "from-b.txt").read_text() == "edited after the repair"


def test_repair_of_a_damaged_database_keeps_it_aside(pair) -> None:
    a, b, address = pair
    db = b.root / ".backer" / "backer.db"
    os.truncate(db, db.stat().st_size // 2)
    disk = _disk(b.root)
    out = _repair(b, "--from", address)
    assert summary_number(out, "chunk bytes received") == 0
    kept = [p for p in (b.root / ".backer").glob("backer.db.damaged-*") if "-wal" not in p.name]
    kept = [p for p in kept if "-shm" not in p.name]
    assert len(kept) == 1 and f"kept as {kept[0]}" in out
    assert _disk(b.root) == disk
    b.sync(address)
    assert snapshot(a.root) == snapshot(b.root)


def test_repair_records_what_differs_as_local_changes_and_loses_nothing(pair) -> None:
    a, b, address = pair
    shutil.rmtree(b.root / ".backer")
    (b.root / "from-b.txt").write_text("b's own file, edited while the metadata was lost")
    (b.root / "docs" / "photo-3.bin").write_bytes(b"a's file, edited on b")
    (b.root / "new-on-b.txt").write_text("new")
    (b.root / "docs" / "photo-5.bin").unlink()  # gone from b: comes back, is not deleted
    out = _repair(b, "--from", address)
    assert summary_number(out, "chunk bytes received") == 0
    assert "recognised 13 entries" in out
    assert "recorded 1 added and 2 modified" in out  # photo-3: no basis, so concurrent
    for _ in range(2):
        b.sync(address)
    assert snapshot(a.root) == snapshot(b.root)
    assert (a.root / "from-b.txt").read_text().startswith("b's own file, edited")
    assert (a.root / "new-on-b.txt").read_text() == "new"
    assert (b.root / "docs" / "photo-5.bin").stat().st_size == 90_000
    photos = {p.read_bytes() for p in (a.root / "docs").glob("photo-3*")}
    assert b"a's file, edited on b" in photos and len(photos) == 2  # a conflict copy


def test_repair_gives_up_own_events_no_peer_has(pair) -> None:
    a, b, address = pair
    (b.root / "never-synced.txt").write_text("recorded on b, never sent")
    b.run("scan", "--dir", str(b.root))
    shutil.rmtree(b.root / ".backer")
    out = _repair(b, "--from", address)
    # the scan's two events: its client-id declaration and the new file
    assert "gave up 2 events of this device that no peer had" in out
    assert "recorded 1 added" in out
    b.sync(address)
    assert (a.root / "never-synced.txt").read_text() == "recorded on b, never sent"
    assert snapshot(a.root) == snapshot(b.root)
    assert "0 forks" in a.run("status", "--dir", str(a.root)).stdout


def test_repair_with_an_invite_when_the_device_key_is_lost_too(pair) -> None:
    a, b, address = pair
    shutil.rmtree(b.root / ".backer")
    shutil.rmtree(b.home)
    disk = _disk(b.root)
    args = ("invite", "--no-wait", "--address", address, "--dir", str(a.root))
    token = a.run(*args).stdout.strip()  # serve, holding the share, makes it
    out = _repair(b, "--token", token)
    assert summary_number(out, "chunk bytes received") == 0
    assert "recorded 0 added and 0 modified" in out
    assert _disk(b.root) == disk
    b.sync(address)
    assert snapshot(a.root) == snapshot(b.root) and _disk(b.root) == disk


def test_repair_refuses_a_healthy_share_and_needs_a_peer(pair) -> None:
    _, b, _ = pair
    healthy = b.run("repair", "--from", "127.0.0.1:1", "--dir", str(b.root), check=False)
    assert healthy.returncode == 1 and "not damaged" in healthy.stderr
    shutil.rmtree(b.root / ".backer")
    no_peer = b.run("repair", "--dir", str(b.root), check=False)
    assert no_peer.returncode == 1 and "--from HOST:PORT" in no_peer.stderr


# -- backer verify ------------------------------------------------------------------------


def _rot(path: Path, offset: int) -> None:
    """Flip one byte in place, keeping size, inode and mtime (what bit rot looks like)."""
    info = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert path.stat().st_ino == info.st_ino and path.stat().st_mtime_ns == info.st_mtime_ns


def _settled_share(tmp_path: Path) -> Device:
    """A share whose files are older than the scanner's freshness window, so that a scan
    trusts their stat from now on."""
    a = Device(tmp_path, "a")
    (a.root / "photos").mkdir(parents=True)
    (a.root / "photos" / "big.bin").write_bytes(os.urandom(1_500_000))
    (a.root / "notes.txt").write_text("notes\n")
    os.symlink("notes.txt", a.root / "link")
    for path in [*a.root.rglob("*")]:
        os.utime(path, ns=(10**18, 10**18), follow_symlinks=False)
    a.run("init", str(a.root))
    return a


def test_verify_reports_a_file_whose_bytes_rotted_under_an_unchanged_stat(
    tmp_path: Path,
) -> None:
    a = _settled_share(tmp_path)
    clean = a.run("verify", "--dir", str(a.root))
    assert "verified 3 files and links" in clean.stdout and "0 do not match" in clean.stdout
    _rot(a.root / "photos" / "big.bin", 700_000)
    assert "0 added, 0 modified" in a.run("scan", "--dir", str(a.root)).stdout  # unnoticed
    found = a.run("verify", "--dir", str(a.root), check=False)
    assert found.returncode == 3
    assert "photos/big.bin: content does not match its recorded version" in found.stderr
    assert "1 do not match" in found.stdout
    elsewhere = a.run("verify", str(a.root / "notes.txt"), "--dir", str(a.root))
    assert "verified 1 files" in elsewhere.stdout
    report = json.loads(a.run("verify", "--json", "--dir", str(a.root), check=False).stdout)
    assert report["mismatched"] == ["photos/big.bin"] and report["checked"] == 3


def test_a_peer_never_receives_the_bytes_of_a_rotted_file(tmp_path: Path) -> None:
    a = _settled_share(tmp_path)
    original = (a.root / "photos" / "big.bin").read_bytes()
    _rot(a.root / "photos" / "big.bin", 700_000)
    rotted = (a.root / "photos" / "big.bin").read_bytes()
    b = Device(tmp_path, "b")
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with a.serving(port):
        b.run("join", token, str(b.root), check=False)
    assert (b.root / "notes.txt").read_text() == "notes\n"
    received = b.root / "photos" / "big.bin"
    assert not received.exists() or received.read_bytes() == original
    assert not any(p.read_bytes() == rotted for p in b.root.rglob("*") if p.is_file())


def test_repair_recognises_files_a_device_was_behind_on_as_their_older_versions(pair) -> None:
    a, b, address = pair
    photo = "docs/photo-2.bin"
    old = (b.root / photo).read_bytes()
    (a.root / photo).write_bytes(b"a newer photo")
    b.sync(address)  # serve scans a's edit as b connects
    events = _events(a)
    shutil.rmtree(b.root / ".backer")
    (b.root / photo).write_bytes(old)  # b as if it had never received the newer photo
    out = _repair(b, "--from", address)
    assert "(1 older ones" in out and "recorded 0 added and 0 modified" in out
    b.sync(address)
    assert (b.root / photo).read_bytes() == b"a newer photo"
    assert snapshot(a.root) == snapshot(b.root)  # no conflict copy anywhere
    assert _events(a) == events
