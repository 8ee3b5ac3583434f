"""A device whose ``.backer/`` comes back from an old backup: it never forks its own log."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nacl.signing

from backer.model.share import Share
from tests.e2e import Device, free_port, invite, snapshot, wait_until


def _pair(tmp_path: Path) -> tuple[Device, Device, int]:
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    a.root.mkdir()
    (a.root / "base.txt").write_text("base")
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with a.serving(port):
        b.run("join", token, str(b.root))
    return a, b, port


def _backed_up_then_edited(tmp_path: Path) -> tuple[Device, Device, int, Path]:
    """A pair whose ``b`` has a backup of its ``.backer/`` and, since, a new file."""
    a, b, port = _pair(tmp_path)
    backup = tmp_path / "b-backup"
    shutil.copytree(b.root / ".backer", backup, symlinks=True)
    (b.root / "after-backup.txt").write_text("written after the backup")
    return a, b, port, backup


def _restore(device: Device, backup: Path) -> None:
    shutil.rmtree(device.root / ".backer")
    shutil.copytree(backup, device.root / ".backer", symlinks=True)


def _forks(device: Device) -> list:
    share = Share(device.root, nacl.signing.SigningKey.generate(), exclusive=False)
    try:
        return share.journal.forks()
    finally:
        share.close()


def test_a_restored_device_waits_for_its_own_events_then_goes_on(tmp_path: Path) -> None:
    a, b, port, backup = _backed_up_then_edited(tmp_path)
    with a.serving(port) as address:
        b.sync(address)
        _restore(b, backup)
        refused = b.run("scan", "--dir", str(b.root), check=False)
        assert refused.returncode == 1 and "restored from an older copy" in refused.stderr
        b.sync(address)  # gives this device its own newer events back
        (b.root / "later.txt").write_text("a new edit after the recovery")
        b.sync(address)
    assert snapshot(a.root) == snapshot(b.root)
    assert (a.root / "later.txt").read_text() == "a new edit after the recovery"
    assert _forks(a) == [] and _forks(b) == []


def test_events_nobody_received_can_be_given_up_without_losing_files(tmp_path: Path) -> None:
    a, b, port = _pair(tmp_path)
    backup = tmp_path / "b-backup"
    shutil.copytree(b.root / ".backer", backup, symlinks=True)
    (b.root / "never-synced.txt").write_text("recorded, then the disk was restored")
    b.run("scan", "--dir", str(b.root))
    _restore(b, backup)
    with a.serving(port) as address:
        b.sync(address)  # a never had those events: still behind
        assert b.run("scan", "--dir", str(b.root), check=False).returncode == 1
        given_up = b.run("scan", "--forget-lost-history", "--dir", str(b.root))
        assert "gave up 2 events" in given_up.stdout  # a client-id declaration + the file
        b.sync(address)
    assert (a.root / "never-synced.txt").read_text() == "recorded, then the disk was restored"
    assert snapshot(a.root) == snapshot(b.root)
    assert _forks(a) == [] and _forks(b) == []


def test_sync_says_when_a_device_signed_two_histories(tmp_path: Path) -> None:
    """A fork was shown only by 'status' while every 'sync' reported success."""
    a, b, port = _pair(tmp_path)
    twin = Device(tmp_path, "twin")  # a copy of b, key and all: one author, two logs
    shutil.copytree(b.root, twin.root, symlinks=True)
    shutil.copytree(b.home, twin.home, symlinks=True)
    (b.root / "on-b.txt").write_text("written on b")
    (twin.root / "on-twin.txt").write_text("written on the copy")
    with a.serving(port) as address:
        b.sync(address)
        result = twin.run("sync", address, "--dir", str(twin.root), check=False)
    assert "signed two different histories" in result.stderr, result.stderr
    assert _forks(twin) or _forks(a)


def test_a_restored_device_back_in_step_records_what_it_skipped_and_finds_its_kept_bytes(
    tmp_path: Path,
) -> None:
    """Seed 991056, as real processes. After the backup, the device saved a new copy of
    ``notes.txt`` (its first bytes kept in its store) and then came back from that
    backup. Once a sync gave it its events back: the edit its person made while it
    waited was recorded only by a later scan, and a restore of the first notes said they
    were not on this device, because the older copy's chunk index still found them at
    the path, which holds the second notes."""
    a, b, port = _pair(tmp_path)
    notes, first, second = b.root / "notes.txt", b"the first notes\n" * 300, b"second\n" * 300
    notes.write_bytes(first)
    backup = tmp_path / "b-backup"
    with a.serving(port) as address:
        b.sync(address)
        shutil.copytree(b.root / ".backer", backup, symlinks=True)
        (b.root / "notes.new").write_bytes(second)
        os.replace(b.root / "notes.new", notes)  # saved as editors save: a new file
        b.sync(address)
        _restore(b, backup)
        (b.root / "while-behind.txt").write_text("written while the device waited")
        b.sync(address)  # its own events come back
        history = b.run("history", str(b.root / "while-behind.txt"), "--json", "--dir", str(b.root))
        assert len(json.loads(history.stdout)) == 1
    old = json.loads(b.run("history", str(notes), "--json", "--dir", str(b.root)).stdout)[0]
    restored = b.run("restore", str(notes), "--version", old["version"], "--dir", str(b.root))
    assert f"restored notes.txt to version {old['version']}" in restored.stdout
    assert notes.read_bytes() == first
    assert _forks(b) == []


def test_a_restored_node_scans_as_soon_as_a_peer_gives_its_events_back(tmp_path: Path) -> None:
    """``backer run`` on a device back from an old ``.backer/``: its start-up scan and
    its watcher's scans record nothing while it waits; the edit made meanwhile used to
    wait for the hourly full scan, and now goes out once a peer gives the events back."""
    a, b, port, backup = _backed_up_then_edited(tmp_path)
    with a.serving(port) as address:
        b.sync(address)
        _restore(b, backup)
        (b.root / "while-behind.txt").write_text("written while the device waited")
        node = b.start()
        try:
            wait_until(lambda: (a.root / "while-behind.txt").exists(), [node], timeout=120)
        finally:
            node.stop()
    assert snapshot(a.root) == snapshot(b.root)
