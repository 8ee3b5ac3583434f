"""Applying received files through the real CLI over TCP: every entry kind, full disks,
odd names, interrupted transfers, links that point out of the share."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from backer.ignore import is_temp_name
from tests.e2e import Device, free_port, invite, snapshot
from tests.helpers import small_disk


def _founder(tmp_path: Path) -> tuple[Device, Device]:
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    a.root.mkdir()
    return a, b


def test_a_share_with_a_symlink_and_a_20_mb_file_is_joined_and_synced(tmp_path: Path) -> None:
    a, b = _founder(tmp_path)
    os.symlink("big.bin", a.root / "link")
    (a.root / "big.bin").write_bytes(os.urandom(20 * 1024 * 1024))
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with a.serving(port) as address:
        b.run("join", token, str(b.root))
        assert snapshot(b.root) == snapshot(a.root)
        (a.root / "link").unlink()
        os.symlink("elsewhere", a.root / "link")
        (a.root / "big.bin").write_bytes(os.urandom(20 * 1024 * 1024))
        out = b.sync(address)
    assert "errors 0" in out, out
    assert snapshot(b.root) == snapshot(a.root)


def _same_or_absent(source: Path, replica: Path) -> None:
    """Every file the replica holds is byte-identical to the source's; no temp files."""
    theirs = snapshot(source)
    for path, entry in snapshot(replica).items():
        assert entry == theirs[path], path
    assert not [p for p in replica.rglob("*") if is_temp_name(p.name)]


def test_join_into_a_full_disk_stops_clearly_and_the_next_sync_finishes(tmp_path: Path) -> None:
    a, b = _founder(tmp_path)
    for n in range(8):
        (a.root / f"part{n}.bin").write_bytes(os.urandom(5 * 1024 * 1024))
    (a.root / "small.txt").write_text("small")
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with small_disk(tmp_path / "disk", "24m") as disk, a.serving(port) as address:
        b.root = disk / "b"
        result = b.run("join", token, str(b.root), check=False)
        assert result.returncode == 1, result
        error = result.stderr.strip()
        assert len(error.splitlines()) == 1 and "disk full: " in error, error
        assert f"MB more needed in {b.root}" in error, error
        _same_or_absent(a.root, b.root)
        result = b.run("sync", address, "--dir", str(b.root), check=False)
        assert result.returncode == 1 and "disk full: " in result.stderr
        _same_or_absent(a.root, b.root)
        subprocess.run(["mount", "-o", "remount,size=80m", str(disk)], check=True)
        b.sync(address)
        assert snapshot(b.root) == snapshot(a.root)


def _versions(device: Device) -> Path:
    return device.root / ".backer" / "versions"


def test_a_replaced_symlink_kept_in_versions_never_lets_a_member_write_outside_the_share(
    tmp_path: Path,
) -> None:
    """A replaced link was hard-linked into versions/ as a link; a member then made a
    directory of that name and, by replacing a file in it, had the victim keep the old
    file *through* the link, outside the share."""
    a, b = _founder(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), a.root / "evil")
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with a.serving(port) as address:
        b.run("join", token, str(b.root))
        assert os.readlink(b.root / "evil") == str(outside)
        (a.root / "evil").unlink()
        (a.root / "evil").write_text("now a file")
        b.sync(address)
        kept = [p for p in _versions(b).iterdir() if p.name.startswith("evil~")]
        assert len(kept) == 1
        (a.root / kept[0].name).mkdir()  # a directory named like the kept entry
        (a.root / kept[0].name / "payload.sh").write_text("#!/bin/sh\necho owned\n")
        b.sync(address)
        (a.root / kept[0].name / "payload.sh").write_text("#!/bin/sh\necho v2\n")
        b.sync(address)
    assert list(outside.iterdir()) == []
    assert not [p for p in _versions(b).rglob("*") if p.is_symlink()]
    assert kept[0].read_text() == str(outside)  # the link's target, as a regular file
    assert snapshot(b.root) == snapshot(a.root)
