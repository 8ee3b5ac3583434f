"""Device names: signed RENAME events, only a device renames itself, bounded, undone
with a removal point; the CLI's `device rename` and the hostname at join."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from backer.errors import BackerError
from backer.model.membership import MAX_DEVICE_NAME, EventKind, checked_name, rename_payload
from backer.model.share import Share
from backer.protocol.session import Session
from backer.protocol.wire import ProtocolError
from tests.e2e import Device, invite
from tests.helpers import make_devices, pump, sync


def test_a_device_renames_itself_and_every_member_shows_the_name_after_reopening(
    tmp_path: Path,
) -> None:
    a, b = make_devices(tmp_path, 2)
    sync(a, b)
    b.rename_device(b.device, "kitchen laptop")
    assert b.rename_device(b.device, " kitchen laptop ") is None  # same name: no event
    sync(a, b)
    assert a.members.names[b.device] == b.members.names[b.device] == "kitchen laptop"
    root, key = a.root, a.key
    a.close()
    with Share.open(root, key) as again:  # kept in the catalog, not only in memory
        assert again.members.names[b.device] == "kitchen laptop"


def test_a_member_cannot_rename_another_device(tmp_path: Path) -> None:
    """Relabelling another device could get the wrong one removed: refused locally, and
    a forged RENAME of another device is ignored by every member."""
    a, b = make_devices(tmp_path, 2)
    sync(a, b)
    with pytest.raises(BackerError, match="can only rename itself"):
        a.rename_device(b.device, "trash me")
    a._append(EventKind.RENAME, rename_payload(b.device, "trash me"))
    sync(a, b)
    assert a.members.names[b.device] == b.members.names[b.device] == "device1"


@pytest.mark.parametrize("size", [32, 32 + MAX_DEVICE_NAME + 1])
def test_rename_events_without_a_name_or_with_too_long_a_name_are_refused(
    tmp_path: Path, size: int
) -> None:
    a, b = make_devices(tmp_path, 2)
    sync(a, b)
    a._append(EventKind.RENAME, a.device + b"x" * (size - 32))
    before = b.journal.count()
    with pytest.raises(ProtocolError, match=f"rename event of {size} bytes"):
        pump(Session(a, "a"), Session(b, "b"))
    assert b.journal.count() == before


def test_a_removed_devices_rename_after_its_removal_point_is_undone_on_arrival(
    tmp_path: Path,
) -> None:
    a, b, c = make_devices(tmp_path, 3)
    for pair in [(a, b), (a, c), (a, b)]:
        sync(*pair)
    c.rename_device(c.device, "my laptop")
    sync(a, c)
    a.remove_device(c.device)
    c.rename_device(c.device, "your bank")  # the thief, after the removal point
    sync(b, c)
    assert b.members.names[c.device] == "your bank"  # b has not heard of the removal
    sync(a, b)
    assert b.members.names[c.device] == a.members.names[c.device] == "my laptop"
    assert b.catalog.member_table()[0][c.device] == "my laptop"


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("   ", "cannot be empty"),
        ("x" * (MAX_DEVICE_NAME + 1), "at most"),
        ("evil\x1b[2Jname", "control characters"),
        ("line\nbreak", "control characters"),
    ],
)
def test_bad_device_names_are_refused(name: str, error: str) -> None:
    with pytest.raises(BackerError, match=error):
        checked_name(name)


def test_device_rename_and_the_hostname_at_join_reach_the_other_devices(tmp_path: Path) -> None:
    founder, other = Device(tmp_path, "a"), Device(tmp_path, "b")
    founder.root.mkdir()
    founder.run("init", str(founder.root))
    with founder.serving() as address:
        other.run("join", invite(founder, address), str(other.root))
    hostname = socket.gethostname()
    other_id = other.run("id").stdout.strip()
    with other.serving() as address:
        founder.sync(address)
    names = {
        d["id"]: d["name"]
        for d in json.loads(founder.run("device", "list", "--json", "--share", "a").stdout)
    }
    assert names[other_id] == hostname  # not "joined with invite ..."

    out = other.run("device", "rename", "  office desktop ", "--share", "b").stdout
    assert out.strip() == f"renamed device {other_id} office desktop"
    with other.serving() as address:
        founder.sync(address)
    listed = founder.run("device", "list", "--share", "a").stdout
    assert f"{other_id}  member   office desktop" in listed
    status = json.loads(founder.run("status", "--json", "--share", "a").stdout)
    assert {d["name"] for d in status["devices"]} == {hostname, "office desktop"}

    bad = other.run("device", "rename", "tab\there", "--share", "b", check=False)
    assert bad.returncode == 1 and "control characters" in bad.stderr
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
