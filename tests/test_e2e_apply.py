"""Applying received files through the real CLI over TCP: every entry kind, full disks,
odd names, interrupted transfers, links that point out of the share."""

from __future__ import annotations

import os
from pathlib import Path

from tests.e2e import Device, free_port, invite, snapshot


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
