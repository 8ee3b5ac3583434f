"""Devices through the real CLI: removing a stolen laptop, key rotation, invites."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nacl.signing

from backer.model.share import Share
from tests.e2e import Device, free_port, join_through, snapshot


def _three(tmp_path: Path) -> tuple[Device, Device, Device, int]:
    """a founds a share with one file; b and c join it through a's serve."""
    a, b, c = Device(tmp_path, "a"), Device(tmp_path, "b"), Device(tmp_path, "c")
    a.root.mkdir()
    (a.root / "first.txt").write_text("before the theft")
    a.run("init", str(a.root))
    port = free_port()
    join_through(a, [b, c], port)
    return a, b, c, port


def _device_id(device: Device) -> str:
    return device.run("id").stdout.strip()


def _share_keys(device: Device) -> list[bytes]:
    key = nacl.signing.SigningKey(device.home.joinpath("device.key").read_bytes())
    with Share.open(device.root, key, exclusive=False) as share:
        return share.share_keys


def test_a_removed_device_can_no_longer_sync_and_the_others_rotate_the_key(
    tmp_path: Path,
) -> None:
    a, b, c, port = _three(tmp_path)
    old_key = _share_keys(a)[0]
    c_id = _device_id(c)
    # b is offline while a removes c (given by the first group of its id, as listed)
    listed = a.run("device", "list", "--dir", str(a.root)).stdout
    assert c_id in listed and listed.count("member") == 3
    said = a.run("device", "remove", c_id[:7], "--dir", str(a.root)).stdout
    assert f"removed device {c_id}" in said and "the 1 other remaining device" in said
    rows = json.loads(a.run("device", "list", "--json", "--dir", str(a.root)).stdout)
    assert [r["removed"] for r in rows if r["id"] == c_id] == [True]
    new_keys = _share_keys(a)
    assert new_keys[0] != old_key and old_key in new_keys
    assert _share_keys(c) == [old_key]

    (a.root / "after.txt").write_text("written after the removal")
    with a.serving(port) as at_a:
        refused = c.run("sync", at_a, "--dir", str(c.root), check=False)
        assert refused.returncode == 1
        assert "this device was removed from the share" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        b.sync(at_a)  # b was offline: it still holds only the old key, and gets the new one
    assert _share_keys(b)[0] == new_keys[0]
    assert (b.root / "after.txt").read_text() == "written after the removal"
    assert not (c.root / "after.txt").exists()

    (b.root / "from-b.txt").write_text("b after the rotation")
    with b.serving() as at_b:
        refused = c.run("sync", at_b, "--dir", str(c.root), check=False)
        assert refused.returncode == 1
        assert "this device was removed from the share" in refused.stderr
        a.sync(at_b)
    assert snapshot(a.root) == snapshot(b.root)
    assert not (c.root / "from-b.txt").exists()
    assert "removed" in a.serve_log


def test_a_member_that_missed_the_rotation_is_reached_with_the_older_key(
    tmp_path: Path,
) -> None:
    a, b, c, _ = _three(tmp_path)
    a.run("device", "remove", _device_id(c), "--dir", str(a.root))
    (a.root / "after.txt").write_text("new")
    with b.serving() as at_b:  # b has not seen the rotation; a dials it
        a.sync(at_b)
    assert _share_keys(b)[0] == _share_keys(a)[0]
    assert (b.root / "after.txt").read_text() == "new"


def test_removal_while_serve_runs_drops_the_device_and_tells_the_others(
    tmp_path: Path,
) -> None:
    a, b, c, port = _three(tmp_path)
    with a.serving(port) as at_a:
        said = a.run("device", "remove", _device_id(c), "--dir", str(a.root)).stdout
        assert "removed device" in said
        refused = c.run("sync", at_a, "--dir", str(c.root), check=False)
        assert "this device was removed from the share" in refused.stderr
        b.sync(at_a)
    listed = b.run("device", "list", "--dir", str(b.root)).stdout
    assert f"{_device_id(c)}  removed" in listed


def test_device_remove_refuses_itself_typos_and_unknown_devices(tmp_path: Path) -> None:
    a = Device(tmp_path, "a")
    a.root.mkdir()
    a.run("init", str(a.root))
    me = _device_id(a)
    for text, expected in [
        (me, "a device cannot remove itself"),
        ("AAAAAAA", "matches no device"),
        ("AB", "at least its first 7 characters"),
        (me[:-1] + ("A" if me[-1] != "A" else "B"), "wrong check character"),
    ]:
        result = a.run("device", "remove", text, "--dir", str(a.root), check=False)
        assert result.returncode == 1 and expected in result.stderr, (text, result.stderr)
        assert result.stderr.startswith("backer: error:")
    assert os.path.exists(a.root / ".backer")
