"""Received events are checked before they are stored; what cannot be applied never
bricks a device, never spreads, and never silently overrides another device's write."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import nacl.signing
import pytest
from pycrdt import Doc, Map

from backer.config.identity import load_or_create_key
from backer.model.materializer import conflict_path, resolve
from backer.model.membership import EventKind
from backer.model.records import Kind, Version, new_version_id
from backer.model.share import Share
from backer.model.state import ROOT
from backer.protocol import session as session_module
from backer.protocol.session import (
    EVENTS_PER_MESSAGE,
    MAX_PENDING_BYTES,
    MAX_PENDING_EVENTS,
    Session,
)
from backer.protocol.wire import Events, FrameReader, ProtocolError
from backer.scanner.content import (
    MAX_CHUNK,
    MIN_CHUNK,
    BadManifest,
    ChunkRef,
    Manifest,
    check_manifest,
    manifest_of_bytes,
)
from journal import Event
from tests.e2e import Device, free_port, invite
from tests.helpers import forge, make_devices, pump, sync, syncing

UNAPPLIABLE = b"\x01\xff"  # a Yjs update that ends in the middle of its first struct


def write_file(share: Share, name: str, data: bytes) -> None:
    (share.root / name).write_bytes(data)
    share.scan()


def test_an_unappliable_state_event_is_refused_before_it_is_stored(tmp_path: Path) -> None:
    honest, member = make_devices(tmp_path, 2)
    sync(honest, member)
    stored = honest.journal.count()
    bad = forge(member, UNAPPLIABLE)
    with pytest.raises(ProtocolError, match="rejected events"):
        pump(Session(member, "m"), Session(honest, "h"))
    assert honest.journal.count() == stored
    assert honest.journal.length(member.device) == bad.seq - 1  # its run's declaration too
    honest.close()
    reopened = Share.open(honest.root, honest.key)  # opens, replays, works
    write_file(reopened, "after.txt", b"still fine")
    assert reopened.catalog.live_versions("after.txt")


def _foreign_value_update(share: Share, key: str, value: object) -> bytes:
    """An update writing ``value`` (not a version record) under ``key`` of the files map."""
    doc = Doc(client_id=share.state.doc.client_id)
    doc.apply_update(share.state.snapshot())
    files = doc.get(ROOT, type=Map)
    before = doc.get_state()
    files[key] = value
    return doc.get_update(before)


@pytest.mark.parametrize(
    "value",
    ["a string, not a record", b"\x01short", 12.5],
)
def test_an_entry_that_is_not_a_version_record_is_refused(tmp_path: Path, value: object) -> None:
    honest, member = make_devices(tmp_path, 2)
    sync(honest, member)
    forge(member, _foreign_value_update(member, f"x.txt\0{new_version_id()}", value))
    with pytest.raises(ProtocolError, match="rejected events"):
        pump(Session(member, "m"), Session(honest, "h"))
    assert not honest.catalog.live_versions("x.txt")


@pytest.mark.parametrize(
    "version",
    [
        Version(Kind.FILE, 1, content=bytes(32), time_ms=2**63),
        Version(Kind.FILE, 2**62, content=bytes(32)),
        Version(Kind.FILE, 1, content=b""),
        Version(Kind.DIRECTORY, 5),
        Version(Kind.SYMLINK, 1, content=b"a\0b"),
    ],
)
def test_absurd_times_and_sizes_are_refused_at_ingest(tmp_path: Path, version: Version) -> None:
    honest, member = make_devices(tmp_path, 2)
    sync(honest, member)
    update, _ = member.state.write([("x.txt", new_version_id(), version)])
    forge(member, update)
    with pytest.raises(ProtocolError, match="bad entry"):
        pump(Session(member, "m"), Session(honest, "h"))
    assert not honest.catalog.live_versions("x.txt")


@pytest.mark.parametrize("elsewhere", [False, True])
def test_a_version_id_already_recorded_cannot_be_written_again(
    tmp_path: Path, elsewhere: bool
) -> None:
    """A member reusing the id of a version this device recorded, with another record at
    its path or at another path, is refused (history would otherwise be rewritten)."""
    honest, member = make_devices(tmp_path, 2)
    write_file(honest, "a.txt", b"honest")
    sync(honest, member)
    (vid,) = honest.catalog.live_versions("a.txt")
    path = "b.txt" if elsewhere else "a.txt"
    forged = Version(Kind.FILE, 6, content=bytes(32), time_ms=1)
    update, _ = member.state.write([(path, vid, forged)])
    forge(member, update)
    with pytest.raises(ProtocolError, match="rewrites the recorded version"):
        pump(Session(member, "m"), Session(honest, "h"))
    assert honest.catalog.history("a.txt")[0].version.size == len(b"honest")
    assert not honest.catalog.live_versions("b.txt")


def test_one_update_using_a_version_id_at_two_paths_is_refused(tmp_path: Path) -> None:
    honest, member = make_devices(tmp_path, 2)
    sync(honest, member)
    vid, version = new_version_id(), Version(Kind.FILE, 1, content=bytes(32), time_ms=1)
    update, _ = member.state.write([("x.txt", vid, version), ("y.txt", vid, version)])
    forge(member, update)
    with pytest.raises(ProtocolError, match="rewrites the recorded version"):
        pump(Session(member, "m"), Session(honest, "h"))
    assert not honest.catalog.live_versions("x.txt")


@pytest.mark.parametrize(
    "vid", ["AAAAAAAAAAA", "AAAAAAAAAAAAA", "AAAAAAAAAA==", "AAAAAAAAAA+/", "AAAAAAAAAAA\u0661"]
)
def test_a_version_id_not_spelled_as_backer_makes_them_is_refused(
    tmp_path: Path, vid: str
) -> None:
    honest, member = make_devices(tmp_path, 2)
    sync(honest, member)
    version = Version(Kind.FILE, 1, content=bytes(32), time_ms=1)
    forge(member, _foreign_value_update(member, f"x.txt\0{vid}", version.encode()))
    with pytest.raises(ProtocolError, match="bad version id"):
        pump(Session(member, "m"), Session(honest, "h"))
    assert not honest.catalog.live_versions("x.txt")


def test_a_stored_unappliable_event_is_quarantined_not_fatal_and_not_relayed(
    tmp_path: Path,
) -> None:
    honest, member, third = make_devices(tmp_path, 3)
    sync(honest, member)
    sync(honest, third)
    bad = forge(member, UNAPPLIABLE)
    later = forge(member, b"\x00\x00")
    held = honest.journal.length(member.device)
    raws = [e.raw for e in member.journal.events(member.device, held)]
    assert raws[-2:] == [bad.raw, later.raw]
    # stored the way an earlier version of backer stored it: first, unchecked
    honest.journal.ingest(raws, member.journal.summary()[member.device], lambda _: True)
    honest.close()
    reopened = Share.open(honest.root, honest.key)
    assert [(a, s) for a, s, _ in reopened.journal.quarantined()] == [(member.device, bad.seq)]
    write_file(reopened, "fine.txt", b"honest work goes on")
    sync(reopened, third)
    assert third.catalog.live_versions("fine.txt")
    assert third.journal.length(member.device) == bad.seq  # neither it nor what follows
    reopened.close()
    Share.open(honest.root, honest.key).close()  # and every later open works too


def test_status_reports_a_quarantined_event(tmp_path: Path) -> None:
    device = Device(tmp_path, "d")
    device.root.mkdir()
    device.run("init", str(device.root))
    key = load_or_create_key(device.home)
    with Share.open(device.root, key, home=device.home) as share:
        bad = forge(share, UNAPPLIABLE)  # stored unchecked: replayed (and set aside) on next open
    text = device.run("status", "--dir", str(device.root)).stdout
    assert f"quarantined event {bad.seq} of" in text, text
    report = json.loads(device.run("status", "--json", "--dir", str(device.root)).stdout)
    assert report["quarantined"][0]["seq"] == bad.seq
    assert "truncated" in report["quarantined"][0]["reason"]
    device.run("scan", "--dir", str(device.root))


def _forge_under_client(share: Share, client_id: int, path: str) -> bytes:
    """An update whose item claims another device's Yjs client id, at the clock that
    device will use next."""
    doc = Doc(client_id=client_id)
    doc.apply_update(share.state.snapshot())
    files = doc.get(ROOT, type=Map)
    before = doc.get_state()
    version = Version(Kind.FILE, 4, content=bytes(32), device=share.device[:8], time_ms=1)
    files[f"{path}\0{new_version_id()}"] = version.encode()
    return doc.get_update(before)


def test_a_forged_item_under_another_devices_client_id_cannot_drop_its_write(
    tmp_path: Path,
) -> None:
    victim, writer, member = make_devices(tmp_path, 3)
    sync(victim, writer)
    write_file(writer, "first.txt", b"one")
    sync(writer, member)
    sync(writer, victim)
    sync(member, victim)
    assert victim.catalog.live_versions("first.txt")
    forged = _forge_under_client(member, writer.state.doc.client_id, "decoy.txt")
    forge(member, forged)
    with pytest.raises(ProtocolError, match="another device owns"):
        pump(Session(member, "m"), Session(victim, "v"))
    write_file(writer, "second.txt", b"two")  # the writer's next item: the forged clock
    sync(writer, victim)
    assert victim.catalog.live_versions("second.txt")
    assert not victim.catalog.live_versions("decoy.txt")


def _relay_first(member: Share, victim: Share, raws: list[bytes]) -> None:
    """``member`` sends ``victim`` its own last events before any other device's."""
    checkpoint = member.journal.summary()[member.device]
    syncing(Session(victim, "v")).receive(Events(checkpoint.encode(), raws, 0))


def test_a_member_relaying_another_devices_items_cannot_take_its_client_id(
    tmp_path: Path,
) -> None:
    victim, writer, member = make_devices(tmp_path, 3)
    sync(victim, writer)
    sync(victim, member)
    sync(writer, member)
    lacking = victim.state.doc.get_state()
    write_file(writer, "w1.txt", b"the writer's")
    sync(writer, member)  # the member now holds the writer's items, under its client id
    relayed = forge(member, member.state.doc.get_update(lacking))  # signed by the member
    run = list(member.journal.events(member.device, victim.journal.length(member.device)))
    assert relayed in run
    with pytest.raises(ProtocolError, match="undeclared client id"):
        _relay_first(member, victim, [e.raw for e in run])
    write_file(writer, "w2.txt", b"the writer's next")
    sync(writer, victim)
    assert victim.journal.length(writer.device) == writer.journal.length(writer.device)
    assert victim.catalog.live_versions("w1.txt") and victim.catalog.live_versions("w2.txt")
    assert (victim.root / "w2.txt").read_bytes() == b"the writer's next"


def test_a_client_declaration_whose_nonce_does_not_derive_the_used_client_id_is_refused(
    tmp_path: Path,
) -> None:
    victim, writer, member = make_devices(tmp_path, 3)
    sync(victim, member)
    sync(victim, writer)
    write_file(writer, "w1.txt", b"the writer's")
    own = writer.journal.events(writer.device)
    declared = [e.payload for e in own if e.kind == EventKind.CLIENT]
    assert declared == [writer.state.nonce]
    # the writer's own nonce, declared by the member: it derives the member's id, not this one
    stolen = _forge_under_client(member, writer.state.doc.client_id, "decoy.txt")
    start = victim.journal.length(member.device)
    member.journal.append(
        member.key, [(EventKind.CLIENT, writer.state.nonce), (EventKind.STATE, stolen)]
    )
    run = [e.raw for e in member.journal.events(member.device, start)]
    with pytest.raises(ProtocolError, match="undeclared client id"):
        _relay_first(member, victim, run)
    assert victim.journal.length(member.device) == start
    sync(writer, victim)
    assert victim.catalog.live_versions("w1.txt")
    assert not victim.catalog.live_versions("decoy.txt")


# -- end to end: the real CLI over TCP ----------------------------------------------------


def _member_forges(device: Device, payload: bytes) -> None:
    """A modified client: the event is signed and marked as applied on its own device,
    so that the stock CLI sends it as is."""
    key = load_or_create_key(device.home)
    with Share.open(device.root, key, home=device.home) as share:
        forge(share, payload)
        with share.db.conn:
            share.catalog.set_meta("catalog_position", share.journal.position())
            share.catalog.set_meta("doc_position", share.journal.position())


def test_a_members_unappliable_event_does_not_brick_the_honest_device_e2e(
    tmp_path: Path,
) -> None:
    honest, member, third = Device(tmp_path, "h"), Device(tmp_path, "m"), Device(tmp_path, "t")
    honest.root.mkdir()
    (honest.root / "a.txt").write_text("shared")
    honest.run("init", str(honest.root))
    port = free_port()
    tokens = [invite(honest, f"127.0.0.1:{port}") for _ in range(2)]
    with honest.serving(port) as at_honest:
        member.run("join", tokens[0], str(member.root))
        third.run("join", tokens[1], str(third.root))
        _member_forges(member, UNAPPLIABLE)
        refused = member.run("sync", at_honest, "--dir", str(member.root), check=False)
        assert refused.returncode == 1, refused.stderr
        assert "rejected events" in refused.stderr and "Traceback" not in refused.stderr
        (third.root / "b.txt").write_text("more")
        third.run("scan", "--dir", str(third.root))
        third.sync(at_honest)
    assert "rejected events" in honest.serve_log
    status = honest.run("status", "--json", "--dir", str(honest.root))
    assert json.loads(status.stdout)["files"] == 2
    with honest.serving() as again:  # serve and sync still work on the honest device
        third.sync(again)
    assert (honest.root / "b.txt").read_text() == "more"
    log = third.run("log", "--json", "--dir", str(third.root)).stdout
    member_id = json.loads(member.run("status", "--json", "--dir", str(member.root)).stdout)[
        "device"
    ]
    assert not any(
        line["author"] == member_id and line["kind"] == "state" for line in json.loads(log)
    )


# -- absurd times and unknown kinds ---------------------------------------------------------


def test_conflict_copy_naming_survives_an_absurd_time() -> None:
    absurd = Version(Kind.FILE, 1, content=bytes(32), device=b"m" * 8, time_ms=2**64 - 1)
    honest = Version(Kind.FILE, 1, content=b"\1" * 32, device=b"h" * 8, time_ms=1)
    assert "sync-conflict-99991231-235959" in conflict_path("dir/a.txt", absurd)
    resolution = resolve("a.txt", {"AAAAAAAAAAAA": absurd, "BBBBBBBBBBBB": honest})
    assert len(resolution.copies) == 1


@pytest.mark.parametrize(
    ("kind", "time_ms", "payload", "reason"),
    [
        (EventKind.INVITE, 1, b"short", "invite event of 5 bytes"),
        (99, 1, b"", "unknown event kind 99"),
        (EventKind.STATE, 2**64 - 1, b"\0\0", "out of range"),
    ],
)
def test_unknown_kinds_and_absurd_event_times_are_refused_at_ingest(
    tmp_path: Path, kind: int, time_ms: int, payload: bytes, reason: str
) -> None:
    honest, member = make_devices(tmp_path, 2)
    sync(honest, member)
    member.journal.append(member.key, [(kind, payload)], time_ms)
    with pytest.raises(ProtocolError, match=reason):
        pump(Session(member, "m"), Session(honest, "h"))


def test_log_and_history_survive_absurd_times_and_unknown_kinds(tmp_path: Path) -> None:
    device = Device(tmp_path, "d")
    device.root.mkdir()
    (device.root / "a.txt").write_text("x")
    device.run("init", str(device.root))
    key = load_or_create_key(device.home)
    with Share.open(device.root, key, home=device.home) as share:  # stored unchecked, as
        share.journal.append(share.key, [(99, b"")], 2**64 - 1)  # an earlier version did
    for command in ("log", "history"):
        args = (command, str(device.root / "a.txt")) if command == "history" else (command,)
        for extra in ((), ("--json",)):
            result = device.run(*args, *extra, "--dir", str(device.root), check=False)
            assert result.returncode == 0, result.stderr
    assert "kind-99" in device.run("log", "--dir", str(device.root)).stdout


# -- what other devices named reaches the terminal escaped -----------------------------------

OSC52 = "\x1b]52;c;cm0gLXJmIH4K\x07"  # would set the clipboard of the reader's terminal
BIDI = "\u202etxt.exe"


def test_status_log_and_history_escape_control_and_bidi_characters(tmp_path: Path) -> None:
    device = Device(tmp_path, "d")
    device.root.mkdir()
    name = f"x{OSC52}\x9b31m{BIDI}"
    (device.root / name).write_text("payload")
    device.run("init", str(device.root))
    key = load_or_create_key(device.home)
    other = nacl.signing.SigningKey.generate()
    with Share.open(device.root, key, home=device.home) as share:
        share.admit(bytes(other.verify_key), f"laptop{OSC52}\x7f")
    outputs = [
        device.run("status", "--dir", str(device.root)).stdout,
        device.run("log", "--dir", str(device.root)).stdout,
        device.run("history", str(device.root / name), "--dir", str(device.root)).stdout,
    ]
    for text in outputs:
        assert not any(ch in text for ch in "\x1b\x07\x9b\x7f\u202e"), repr(text)
    assert "laptop\\x1b]52;c;cm0gLXJmIH4K\\x07\\x7f" in outputs[0]
    assert "x\\x1b]52;c;cm0gLXJmIH4K\\x07\\x9b31m\\u202etxt.exe" in outputs[1]
    status = json.loads(device.run("status", "--json", "--dir", str(device.root)).stdout)
    assert f"laptop{OSC52}\x7f" in [d["name"] for d in status["devices"]]
    log = json.loads(device.run("log", "--json", "--dir", str(device.root)).stdout)
    assert name in [c["path"] for line in log for c in line["changes"]]


# -- manifests are promises about sizes --------------------------------------------------


def _publish(member: Share, path: str, version: Version) -> None:
    update, delta = member.state.write([(path, new_version_id(), version)])
    member._append(EventKind.STATE, update, delta)


def _receive(honest: Share, member: Share) -> Session:
    receiver = Session(honest, "h")
    pump(Session(member, "m"), receiver)
    return receiver


def test_a_manifest_declaring_more_than_its_chunks_hold_never_becomes_a_file(
    tmp_path: Path,
) -> None:
    honest, member = make_devices(tmp_path, 2)
    sync(honest, member)
    data = os.urandom(400 * 1024)  # what the wire carries
    write_file(member, "small.bin", data)
    real = manifest_of_bytes(data)
    *head, last = real.chunks
    lying_length = 2**30 - sum(c.length for c in head)  # the last chunk "is" the rest of 1 GiB
    lie = Manifest((*head, last._replace(length=lying_length)))
    with member.db.conn:
        member.catalog.put_manifest_bodies([lie])
    _publish(member, "big.bin", Version(Kind.FILE, 2**30, content=lie.id, time_ms=1))
    receiver = _receive(honest, member)
    assert not (honest.root / "big.bin").exists()
    assert (honest.root / "small.bin").read_bytes() == data
    assert any("big.bin" in e for r in receiver.replicator.reports for e in map(str, r.errors))
    assert honest.catalog.manifest(lie.id) is None  # refused, never stored


def test_a_declared_size_with_empty_content_is_refused(tmp_path: Path) -> None:
    honest, member = make_devices(tmp_path, 2)
    sync(honest, member)
    empty = manifest_of_bytes(b"")
    _publish(member, "sparse.bin", Version(Kind.FILE, 8 * 2**30, content=empty.id, time_ms=1))
    receiver = _receive(honest, member)
    assert not (honest.root / "sparse.bin").exists()
    assert any("8589934592" in e for r in receiver.replicator.reports for e in map(str, r.errors))


def test_a_received_chunk_must_be_as_long_as_its_manifest_says(tmp_path: Path) -> None:
    honest, member = make_devices(tmp_path, 2)
    sync(honest, member)
    first, second = os.urandom(40 * 1024), os.urandom(40 * 1024)
    write_file(member, "a.bin", first)
    write_file(member, "b.bin", second)
    a, b = manifest_of_bytes(first).chunks[0], manifest_of_bytes(second).chunks[0]
    short, long = a._replace(length=20 * 1024), b._replace(offset=20 * 1024, length=60 * 1024)
    swapped = Manifest((short, long))  # adds up, within bounds, but the lengths are lies
    with member.db.conn:
        member.catalog.put_manifest_bodies([swapped])
    _publish(member, "c.bin", Version(Kind.FILE, 80 * 1024, content=swapped.id, time_ms=1))
    receiver = _receive(honest, member)
    assert not (honest.root / "c.bin").exists()
    assert any("c.bin" in e for r in receiver.replicator.reports for e in map(str, r.errors))


@pytest.mark.parametrize(
    ("lengths", "size", "reason"),
    [
        ([MAX_CHUNK + 1], MAX_CHUNK + 1, "chunk 0"),
        ([MIN_CHUNK - 1, 100], MIN_CHUNK + 99, "chunk 0"),
        ([0], 0, "chunk 0"),
        ([MIN_CHUNK, MIN_CHUNK], 3 * MIN_CHUNK, "add up"),
    ],
)
def test_manifest_checks(lengths: list[int], size: int, reason: str) -> None:
    offsets = [sum(lengths[:i]) for i in range(len(lengths))]
    manifest = Manifest(
        tuple(ChunkRef(bytes(32), o, n) for o, n in zip(offsets, lengths, strict=True))
    )
    with pytest.raises(BadManifest, match=reason):
        check_manifest(manifest, size)
    check_manifest(manifest_of_bytes(os.urandom(300_000)), 300_000)
    check_manifest(manifest_of_bytes(b""), 0)


# -- buffered, not yet verified events have one cap per session ------------------------------


def test_pending_events_of_fake_authors_share_one_cap_per_session(tmp_path: Path) -> None:
    (honest,) = make_devices(tmp_path, 1)
    session = syncing(Session(honest, "h"))
    payload = bytes(4 * 1024 * 1024)
    with pytest.raises(ProtocolError, match="cap"):
        for n in range(MAX_PENDING_BYTES // len(payload) + 2):  # each author far below it
            fake = nacl.signing.SigningKey(n.to_bytes(32, "big"))
            event = Event.create(fake, 0, bytes(32), 1, EventKind.STATE, payload)
            session.receive(Events(b"", [event.raw], 1))
    assert sum(map(len, (r for run in session.pending_run.values() for r in run))) <= (
        MAX_PENDING_BYTES + len(payload) + 1024
    )


def test_pending_events_count_what_they_hold_not_their_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each buffered event is a bytes object and a list slot: counted by length, tiny
    ones held 28 times what the cap counted (2 bytes each, 56 held). Decoded from the
    wire as a node receives them, so each is an object of its own."""
    (honest,) = make_devices(tmp_path, 1)
    session = syncing(Session(honest, "h"))
    cap = 2 << 20
    monkeypatch.setattr(session_module, "MAX_PENDING_BYTES", cap)
    monkeypatch.setattr(session_module, "MAX_PENDING_EVENTS", 10**9)  # (the bytes' cap here)
    real = honest.rename_device(honest.device, "x").raw
    frame = Events(b"", [real, *[b"xy"] * (EVENTS_PER_MESSAGE - 2), real], 1).encode()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        with pytest.raises(ProtocolError, match="cap"):
            for _ in range(4 * cap // (EVENTS_PER_MESSAGE * 56)):  # 4 times the cap, held
                (message,) = FrameReader().feed(frame)
                session.receive(message)
                held = tracemalloc.get_traced_memory()[0] - start
        assert held <= cap * 1.1
    finally:
        tracemalloc.stop()
    too_many = Events(b"", [real] * (EVENTS_PER_MESSAGE + 1), 1)
    with pytest.raises(ProtocolError, match=f"of {EVENTS_PER_MESSAGE + 1} events"):
        syncing(Session(honest, "h")).receive(too_many)


def test_R70_pending_events_are_counted_too(tmp_path: Path) -> None:
    """Tiny events of a run that never ends were bounded by what they hold alone
    (~1,200,000 of 2 bytes in 64 MiB): their number is bounded too, four messages'
    worth, whatever they hold."""
    (honest,) = make_devices(tmp_path, 1)
    session = syncing(Session(honest, "h"))
    real = honest.rename_device(honest.device, "x").raw
    tiny = Events(b"", [real, *[b"xy"] * (EVENTS_PER_MESSAGE - 2), real], 1)
    received = 0
    with pytest.raises(ProtocolError, match=f"cap \\({MAX_PENDING_EVENTS} events"):
        while received <= MAX_PENDING_EVENTS:
            session.receive(tiny)
            received += EVENTS_PER_MESSAGE
    assert received == MAX_PENDING_EVENTS
    assert session.pending_bytes < MAX_PENDING_BYTES // 64


# -- the variant that makes yrs panic ---------------------------------------------------------

POISON = bytes.fromhex("01010501000000")  # client 5 from clock 1: one garbage range of length 0


def test_an_update_that_makes_yrs_panic_later_is_refused_before_yrs_sees_it(
    tmp_path: Path,
) -> None:
    bare = Doc()
    bare.apply_update(POISON)  # yrs takes it ...
    with pytest.raises(BaseException, match="divide by zero"):
        bare.get_update()  # ... and every later snapshot of that document panics
    honest, member = make_devices(tmp_path, 2)
    sync(honest, member)
    forge(member, POISON)
    with pytest.raises(ProtocolError, match="rejected events"):
        pump(Session(member, "m"), Session(honest, "h"))
    honest.state.snapshot()
    honest.close()
    Share.open(honest.root, honest.key).close()
