"""Membership: removal points, key rotation, revoked invites, the bounded member table."""

from __future__ import annotations

import os
import time
from pathlib import Path

import nacl.signing
import pytest

from backer.errors import BackerError
from backer.model import membership
from backer.model.membership import EventKind, member_payload, open_key
from backer.model.state import Delta
from backer.protocol.session import Session
from backer.protocol.wire import ProtocolError
from tests.helpers import make_devices, pump, sync, timing


def _three(tmp_path: Path):
    a, b, c = make_devices(tmp_path, 3)
    sync(a, b)
    sync(a, c)
    sync(a, b)
    return a, b, c


def test_events_a_removed_device_made_after_its_removal_point_are_rejected(
    tmp_path: Path,
) -> None:
    a, b, c = _three(tmp_path)
    a.remove_device(c.device)
    kept = a.members.removed[c.device]
    assert kept == a.journal.length(c.device)
    (c.root / "stolen.txt").write_text("written by the thief")
    c.scan()
    sync(b, c)  # b has not heard of the removal: it takes c's new event
    assert b.journal.length(c.device) == kept + 2  # its client id's declaration, its write
    sync(a, b)  # a gets the removal's news to b, and refuses c's event from b
    assert a.journal.length(c.device) == kept
    assert b.members.removed == {c.device: kept}
    assert all(path != "stolen.txt" for path, _, _ in a.catalog.all_live())
    assert not (a.root / "stolen.txt").exists()


def test_the_new_share_key_is_sealed_to_the_remaining_members_only(tmp_path: Path) -> None:
    a, b, c = _three(tmp_path)
    old = a.share_key
    a.remove_device(c.device)
    assert a.share_key != old and a.share_keys == [a.share_key, old]
    key_events = [e for e in a.journal.events(a.device) if e.kind == EventKind.KEY]
    assert len(key_events) == 1
    assert open_key(key_events[0].payload, c.key) is None
    assert open_key(key_events[0].payload, b.key) == (1, a.share_key)
    sync(a, b)
    assert b.share_keys == a.share_keys
    sync(a, c)  # in memory, without the handshake that refuses it: still nothing to read
    assert c.share_keys == [old]


def test_a_removal_revokes_the_invites_the_removed_device_knew(tmp_path: Path) -> None:
    a, _, c = _three(tmp_path)
    invite_id, _ = a.create_invite(3600)
    sync(a, c)
    assert c.invite_key(invite_id) is not None
    a.remove_device(c.device)
    assert a.invite_key(invite_id) is None
    with pytest.raises(BackerError, match="revoked"):
        a.invite_outcome(invite_id)


def test_what_a_removed_device_signed_after_its_removal_point_is_undone_on_arrival(
    tmp_path: Path,
) -> None:
    a, b, c, d = make_devices(tmp_path, 4)
    for pair in [(a, b), (a, c), (a, d), (a, b), (a, c)]:
        sync(*pair)
    a.remove_device(c.device)
    with pytest.raises(BackerError, match="admitted before"):
        a.admit(c.device, "back again")
    with pytest.raises(BackerError, match="cannot remove that device"):
        a.remove_device(c.device)
    # the thief, after its removal point, removes d and admits a device of its own; b
    # meets it before it hears of the removal, then hears of it
    c.remove_device(d.device)
    accomplice = os.urandom(32)
    c.admit(accomplice, "accomplice")
    sync(b, c)
    assert d.device not in b.members and accomplice in b.members
    sync(a, b)
    assert d.device in b.members and accomplice not in b.members
    assert c.device not in b.members and accomplice not in a.members


def test_members_are_bounded_and_a_member_add_beyond_the_bound_admits_nobody(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(membership, "MAX_MEMBERS", 5)
    a, b = make_devices(tmp_path, 2)
    for n in range(3):
        a.admit(os.urandom(32), f"extra {n}")
    with pytest.raises(BackerError, match="maximum of 5 devices"):
        a.admit(os.urandom(32), "one too many")
    one_too_many = os.urandom(32)
    a._append(EventKind.MEMBER_ADD, member_payload(one_too_many, "forced"))
    sync(a, b)
    assert len(a.members.active) == len(b.members.active) == 5
    assert one_too_many not in a.members and one_too_many not in b.members


@timing
def test_ingest_never_reads_the_member_table_per_event(tmp_path: Path) -> None:
    """20,000 admissions took 55 s to ingest when every event read the whole table."""
    a, b = make_devices(tmp_path, 2)
    entries = [
        (
            EventKind.MEMBER_ADD,
            member_payload(bytes(nacl.signing.SigningKey.generate().verify_key), "x"),
        )
        for _ in range(3000)
    ]
    a.journal.append(a.key, entries)
    with a.db.conn:  # fold them into a's catalog as an append would
        for position, event in a.journal.since(a.catalog.get_int("catalog_position")):
            a._record(position, event, Delta())
    statements: list[str] = []
    b.db.conn.set_trace_callback(statements.append)
    started = time.monotonic()
    pump(Session(a, "a"), Session(b, "b"))
    elapsed = time.monotonic() - started
    b.db.conn.set_trace_callback(None)
    assert len(b.members.active) == membership.MAX_MEMBERS
    assert not [s for s in statements if "FROM members" in s]
    assert elapsed < 30, elapsed


def test_membership_events_of_the_wrong_size_are_refused_before_storing(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    sync(a, b)
    a._append(EventKind.MEMBER_REMOVE, b.device + bytes(9))
    before = b.journal.count()
    with pytest.raises(ProtocolError, match="member_remove event of 41 bytes"):
        pump(Session(a, "a"), Session(b, "b"))
    assert b.journal.count() == before and b.device in b.members
