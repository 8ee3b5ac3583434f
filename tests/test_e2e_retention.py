"""Retention end to end: `prune` frees exactly what `prune --dry-run` says and nothing
before; `config` checks what it stores; a whole share re-recorded on a recovered
device (repair, join) costs no second copy of its files (real CLI processes)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import Device, free_port, invite, joined_pair, keep_nothing_replaced

FILES, SIZE = 24, 200_000


def disk_use(root: Path) -> int:
    """Bytes allocated under ``root`` (.backer included), each inode counted once —
    what ``du`` says."""
    seen, total = set(), 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            info = os.lstat(os.path.join(dirpath, name))
            if info.st_ino not in seen:
                seen.add(info.st_ino)
                total += info.st_blocks * 512
    return total


def store_files(device: Device) -> dict[str, int]:
    """The store's entries: name -> link count."""
    store = device.root / ".backer" / "store"
    return {p.name: p.stat().st_nlink for p in store.glob("*/*")}


def _save(path: Path, data: bytes) -> None:
    """Save as an editor does: a new file renamed over the old one."""
    new = path.with_name(path.name + ".saving")
    new.write_bytes(data)
    new.replace(path)


def _json(device: Device, *args: str) -> dict:
    return json.loads(device.run(*args, "--json", "--dir", str(device.root)).stdout)


@pytest.fixture
def edited(tmp_path: Path) -> Device:
    """A share whose files were each saved over three times on this device."""
    a = Device(tmp_path, "a")
    a.root.mkdir()
    for i in range(FILES):
        (a.root / f"doc-{i}.bin").write_bytes(os.urandom(SIZE))
    a.run("init", str(a.root))
    for _ in range(3):
        for i in range(FILES):
            _save(a.root / f"doc-{i}.bin", os.urandom(SIZE))
        a.run("scan", "--dir", str(a.root))
    return a


def test_prune_dry_run_changes_nothing_and_prune_frees_what_it_said(edited: Device) -> None:
    a = edited
    assert len(store_files(a)) == 4 * FILES  # the device that edited kept the old bytes
    nothing = _json(a, "prune")  # all within the last hour: kept
    assert nothing["files"] == 0 and nothing["kept_files"] == 4 * FILES
    keep_nothing_replaced(a)
    before, files = disk_use(a.root), store_files(a)
    said = _json(a, "prune", "--dry-run")
    assert said["dry_run"] and said["files"] == 3 * FILES and said["versions"] == 3 * FILES
    assert said["bytes"] >= 3 * FILES * SIZE
    assert disk_use(a.root) == before and store_files(a) == files  # changed nothing
    done = _json(a, "prune")
    assert {k: v for k, v in done.items() if k not in ("dry_run", "cap", "announced")} == {
        k: v for k, v in said.items() if k not in ("dry_run", "cap", "announced")
    }
    assert (said["announced"], done["announced"]) == (0, 1)  # 72 contents: one UNHELD event
    freed = before - disk_use(a.root)
    assert abs(freed - said["bytes"]) <= 64 * 1024  # (the database's own pages move too)
    assert len(store_files(a)) == FILES and set(store_files(a).values()) == {2}  # live ones
    history = _json(a, "history", str(a.root / "doc-0.bin"))
    assert [row["pruned"] is not None for row in history] == [True, True, True, False]
    assert _json(a, "prune")["files"] == 0


def test_config_checks_every_value_in_one_line(edited: Device) -> None:
    a = edited
    for args, words in (
        (("keep-all", "forever"), "not a duration"),
        (("max-disk", "120%"), "not a percentage"),
        (("daily-for", "2h"), "cannot be shorter than"),
        (("colour", "red"), "unknown setting"),
        (("colour",), "unknown setting"),
    ):
        result = a.run("config", *args, "--dir", str(a.root), check=False)
        assert result.returncode == 1 and words in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    a.run("config", "max-disk", "5%", "--dir", str(a.root))
    assert a.run("config", "max-disk", "--dir", str(a.root)).stdout.strip() == "5%"
    listing = a.run("config", "--dir", str(a.root)).stdout
    assert "max-disk = 5%  #" in listing and "keep-all = 1h (default)" in listing


def test_R14_a_stored_value_backer_did_not_write_falls_back_to_its_default(
    tmp_path: Path,
) -> None:
    """An integer (or undecodable bytes) in a retention row made `config` and `prune`
    an internal error and stopped the node serving the share."""
    a = Device(tmp_path, "a")
    a.root.mkdir()
    a.run("init", str(a.root))
    a.run("config", "weekly-for", "30d", "--dir", str(a.root))
    with sqlite3.connect(a.root / ".backer" / "backer.db") as db:
        db.execute("INSERT OR REPLACE INTO meta VALUES ('retention.keep-all', 12345)")
        db.execute("INSERT OR REPLACE INTO meta VALUES ('retention.max-disk', x'fffe')")
    listing = a.run("config", "--dir", str(a.root))
    assert "keep-all = 1h (default)" in listing.stdout and "weekly-for = 30d  #" in listing.stdout
    warnings = listing.stderr.strip().splitlines()
    assert len(warnings) == 2 and all("default used" in w for w in warnings), warnings
    assert a.run("prune", "--dry-run", "--dir", str(a.root)).returncode == 0


@pytest.fixture
def pair(tmp_path: Path):
    """a serving, b joined and in sync with it."""
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    a.root.mkdir()
    for i in range(FILES):
        (a.root / f"photo-{i}.bin").write_bytes(os.urandom(SIZE))
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with a.serving(port) as address:
        b.run("join", token, str(b.root))
        b.sync(address)
        yield a, b, address


def test_repair_re_records_a_whole_share_without_a_second_copy(pair) -> None:
    """Disk use of a device whose .backer/ was lost (then damaged), recovered by
    repair: the files are recognised and kept by link, not copied."""
    _, b, address = pair
    data = FILES * SIZE
    before = disk_use(b.root)
    shutil.rmtree(b.root / ".backer")
    b.run("repair", "--from", address, "--dir", str(b.root))
    after_lost = disk_use(b.root)
    db = b.root / ".backer" / "backer.db"
    os.truncate(db, db.stat().st_size // 2)  # damaged: the old store stays beside it
    b.run("repair", "--from", address, "--dir", str(b.root))
    after_damaged = disk_use(b.root)
    for after in (after_lost, after_damaged):
        assert after - before < data // 10, (before, after_lost, after_damaged)
    assert len(store_files(b)) == FILES and set(store_files(b).values()) == {2}
    _save(b.root / "photo-0.bin", b"edited on b after the repair")  # the old bytes stay
    b.sync(address)
    assert sorted(store_files(b).values()) == [1] + [2] * FILES  # the old photo-0, alone


def test_joining_again_into_the_same_files_makes_no_second_copy(pair, tmp_path: Path) -> None:
    """A device that lost its metadata joins again, with a new device key, into the
    folder that still holds every file."""
    a, b, address = pair
    before = disk_use(b.root)
    shutil.rmtree(b.root / ".backer")
    again = Device(tmp_path, "b-again")
    again.root = b.root
    token = a.run("invite", "--no-wait", "--address", address, "--dir", str(a.root)).stdout
    again.run("join", token.strip(), str(again.root))
    again.sync(address)
    assert disk_use(b.root) - before < FILES * SIZE // 10
    assert len(store_files(again)) == FILES


def test_history_says_when_a_replaced_version_is_pruned_on_every_device(tmp_path: Path) -> None:
    """`history` said only "pruned here": whether another device still held the bytes
    (so a restore could fetch them) or none did was nowhere to be seen."""
    a, b, ports = joined_pair(tmp_path)
    _save(a.root / "notes.txt", b"first draft")
    with a.serving(ports[0]) as address:
        b.sync(address)
        _save(a.root / "notes.txt", b"second draft")
        b.sync(address)
    for device in (a, b):
        keep_nothing_replaced(device)
    a.run("prune", "--dir", str(a.root))
    with a.serving(ports[0]) as address:
        b.sync(address)
        shown = a.run(
            "history", str(a.root / "notes.txt"), "--dir", str(a.root)
        ).stdout.splitlines()
        assert "(bytes pruned here " in shown[0] and "; perhaps on " in shown[0], shown
        first = _json(a, "history", str(a.root / "notes.txt"))[0]
        assert (first["bytes"], len(first["held_by"])) == ("elsewhere", 1)
        b.run("prune", "--dir", str(b.root))
        b.sync(address)
    for device in (a, b):
        first, second = _json(device, "history", str(device.root / "notes.txt"))
        assert (first["bytes"], first["held_by"], second["bytes"]) == ("nowhere", [], "here")
        shown = device.run(
            "history", str(device.root / "notes.txt"), "--dir", str(device.root)
        ).stdout
        assert "no device holds them" in shown.splitlines()[0], shown


@contextlib.contextmanager
def _deleted_by(skewed: Device, a: Device, name: str, data: bytes) -> Iterator[str]:
    """``a`` makes a share holding ``name``; ``skewed`` joins it and deletes the file,
    and the deletion reaches ``a``, which is serving at the address yielded."""
    a.root.mkdir()
    (a.root / name).write_bytes(data)
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with a.serving(port) as address:
        skewed.run("join", token, str(skewed.root))
        (skewed.root / name).unlink()
        skewed.sync(address)
        assert not (a.root / name).exists()  # the deletion was applied here
        yield address


class ClockBehind(Device):
    """A device whose wall clock is two years behind (an RTC reset, a board without a
    battery that booted before NTP answered)."""

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "tests.clock_offset", str(-2 * 365 * 86400), *args]


def test_R36_a_file_deleted_on_a_device_whose_clock_is_behind_is_kept_for_the_hour(
    tmp_path: Path,
) -> None:
    """A deletion recorded by a device whose clock was two years behind carried that
    time, and retention aged the deleted version by it: every other device dropped its
    bytes at its next prune, seconds after the deletion ("every version for an hour"),
    and told every device so. A version now stops being current no earlier than when
    this device learned that it did."""
    a = Device(tmp_path, "a")
    work = os.urandom(300_000)
    with _deleted_by(ClockBehind(tmp_path, "b"), a, "thesis.txt", work):
        report = _json(a, "prune")
        assert (report["versions"], report["files"], report["announced"]) == (0, 0, 0), report
        first = _json(a, "history", str(a.root / "thesis.txt"))[0]
        a.run("restore", str(a.root / "thesis.txt"), "--version", first["version"])
    assert (a.root / "thesis.txt").read_bytes() == work


class ClockAhead(Device):
    """A device whose wall clock is two years ahead."""

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "tests.clock_offset", str(2 * 365 * 86400), *args]


def test_R37_prune_all_frees_what_a_device_whose_clock_is_ahead_replaced(
    tmp_path: Path,
) -> None:
    """A deletion recorded by a device whose clock was two years ahead made the deleted
    version younger than "now" on every other device, and `prune --all` (the way to
    free a full disk) kept it: its age was negative, below a keep-all of 0."""
    a = Device(tmp_path, "a")
    with _deleted_by(ClockAhead(tmp_path, "b"), a, "big.bin", os.urandom(2_000_000)):
        assert _json(a, "prune")["files"] == 0  # (inside the hour: kept)
        report = _json(a, "prune", "--all")
    assert (report["files"], report["kept_files"]) == (1, 0), report
    assert report["bytes"] >= 2_000_000, report
    assert store_files(a) == {}


class ClockHoursAhead(Device):
    """``a`` itself, three hours later: its prune sees what it learned as that old."""

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "tests.clock_offset", str(3 * 3600), *args]


def test_R49_what_a_device_once_years_ahead_replaces_ages_from_when_it_arrived(
    tmp_path: Path,
) -> None:
    """A device whose clock was two years ahead edited a file, then had its clock set
    right: it dates everything at its last event at the earliest, so its next edits
    carried that future time for two years, and every other device took what they
    replaced as replaced in the future: inside keep-all, which the size cap spares, for
    two years. A version is now replaced no later than when this device
    recorded what replaced it."""
    a = Device(tmp_path, "a")
    a.root.mkdir()
    (a.root / "doc.bin").write_bytes(os.urandom(300_000))
    a.run("init", str(a.root))
    a.run("config", "max-disk", "0%", "--dir", str(a.root))  # (all but the last hour)
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with a.serving(port) as address:
        ahead = ClockAhead(tmp_path, "b")
        ahead.run("join", token, str(ahead.root))
        (ahead.root / "doc.bin").write_bytes(os.urandom(300_000))
        ahead.sync(address)
        set_right = Device(tmp_path, "b")  # (the same device, its clock corrected)
        (set_right.root / "doc.bin").write_bytes(os.urandom(300_000))
        set_right.sync(address)
    later = ClockHoursAhead(tmp_path, "a")
    report = json.loads(later.run("prune", "--json", "--dir", str(a.root)).stdout)
    assert report["files"] == 2, report  # a's first version and b's from the future
    assert report["kept_files"] == 1, report  # (the live version's, in the share)


def test_a_share_behind_itself_prunes_and_announces_once_it_has_its_events_back(
    tmp_path: Path,
) -> None:
    """A share restored from an older copy of its ``.backer/`` appends nothing until a
    peer gives its own newer events back; ``prune`` still frees its disk, and says what
    it no longer holds once it may append again. It pruned, then failed on that
    announcement with the restore's error (exit 1, half done)."""
    a = Device(tmp_path, "a")
    a.root.mkdir()
    (a.root / "f").write_bytes(os.urandom(SIZE))
    a.run("init", str(a.root), "-q")
    _save(a.root / "f", os.urandom(SIZE))
    a.run("scan", "--dir", str(a.root), "-q")
    backup = tmp_path / "backup"
    shutil.copytree(a.root / ".backer", backup, symlinks=True)
    _save(a.root / "f", os.urandom(SIZE))
    a.run("scan", "--dir", str(a.root), "-q")
    shutil.rmtree(a.root / ".backer")
    shutil.copytree(backup, a.root / ".backer", symlinks=True)
    pruned = _json(a, "prune", "--all")
    assert pruned["versions"] == 1 and pruned["announced"] == 0, pruned
    assert _json(a, "prune", "--all", "--dry-run")["versions"] == 0  # (freed already)
