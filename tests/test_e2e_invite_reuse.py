"""One token used at two members that are out of touch: both joiners get in (each
member enforces single use on its own), and once the two admissions meet, every
device reports the invite as used twice, with both devices (real CLI over TCP)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from backer.protocol.invite import InviteToken
from tests.e2e import Device, free_port, invite


def test_an_invite_used_at_two_members_out_of_touch_is_reported_once_they_meet(
    tmp_path: Path,
) -> None:
    a, b, first, second = (Device(tmp_path, name) for name in ("a", "b", "first", "second"))
    a.root.mkdir()
    a.run("init", str(a.root))
    a_port, b_port = free_port(), free_port()
    with a.serving(a_port) as a_address:
        b.run("join", invite(a, a_address), str(b.root))
    token = invite(a, f"127.0.0.1:{a_port}")
    with a.serving(a_port) as a_address:
        b.sync(a_address)  # b holds the invite now, and can admit with it
        first.run("join", token, str(first.root))
    at_b = InviteToken.decode(token)
    at_b = dataclasses.replace(at_b, addresses=(f"127.0.0.1:{b_port}",)).encode()
    with b.serving(b_port):  # b has not heard that the invite was used
        second.run("join", at_b, str(second.root))
    ids = sorted(d.run("id").stdout.strip() for d in (first, second))
    invite_id = InviteToken.decode(token).invite_id.hex()
    with a.serving(a_port) as a_address:
        synced = b.run("sync", a_address, "--dir", str(b.root))
    assert f"invite {invite_id[:8]} admitted 2 devices" in synced.stderr
    for device in (a, b):
        report = json.loads(device.run("status", "--json", "--dir", str(device.root)).stdout)
        reuses = report["invites_used_twice"]
        assert [(r["invite"], sorted(r["devices"])) for r in reuses] == [(invite_id, ids)]
        shown = device.run("status", "--dir", str(device.root)).stdout
        assert f"warning: invite {invite_id[:8]} admitted 2 devices: " in shown
        assert all(i in shown for i in ids)
    b.run("device", "remove", ids[1], "--dir", str(b.root))
    report = json.loads(b.run("status", "--json", "--dir", str(b.root)).stdout)
    assert report["invites_used_twice"] == []  # handled: the warning goes
