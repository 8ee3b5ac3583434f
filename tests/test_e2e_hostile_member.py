"""A hostile member (tests/hostile_member.py: the real handshake, then crafted messages
and crafted, signed events) against the real CLI's join and against ``backer run``: the
device attacked ends with one line and exit status 1, or converges on what is valid;
never a write outside its folder, an unverified byte in a user file, a traceback or a
hang."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import nacl.signing
import pytest

from backer.config.identity import load_or_create_key
from backer.db import recovery
from backer.model.membership import EventKind, genesis_payload
from backer.model.share import Share
from backer.protocol.session import Session
from backer.protocol.wire import (
    MAX_FRAME,
    CaughtUp,
    Chunks,
    Done,
    Events,
    Hello,
    Message,
    Ping,
    Summary,
    WantChunks,
    Welcome,
)
from journal.event import NO_PREVIOUS, Event
from simulations.hostile import OUTSIDE, SENTINEL, SENTINEL_BYTES, Hostile
from tests.e2e import Device, free_port, invite, snapshot
from tests.hostile_member import HostileMember, Tactic

SCALE = "0.1"  # every deadline a tenth: the idle one is 6 s
JOIN_BOUND_S = 90  # a join against any of these peers ends well within this


class PingsOnly(Tactic):
    """Completes the handshake, says Hello and its Summary, then only keeps the
    connection alive: no events, no CaughtUp."""

    def outgoing(self, session: Session, messages: list[Message]) -> list[Message]:
        return [m for m in messages if isinstance(m, Ping | Hello | Summary | Welcome)]


class ReplaysEvents(Tactic):
    """Sends its first Events message, and then that message again each time the
    joiner acknowledges it, instead of the rest and CaughtUp."""

    def __init__(self) -> None:
        self.first: Events | None = None

    def outgoing(self, session: Session, messages: list[Message]) -> list[Message]:
        out: list[Message] = []
        for message in messages:
            if isinstance(message, Events):
                self.first = self.first or message
                message = self.first
            if not isinstance(message, CaughtUp):
                out.append(message)
        return out

    def incoming(self, session: Session, message: Message) -> list[Message] | None:
        if isinstance(message, Done) and self.first is not None:
            return [self.first]
        return None


class NeverAcknowledges(Tactic):
    """An honest inviter in all but one thing: it never sends Done."""

    def outgoing(self, session: Session, messages: list[Message]) -> list[Message]:
        return [m for m in messages if not isinstance(m, Done)]


class Forges(Tactic):
    """What the simulation's hostile member serves when it tampers: chunks and
    manifests that do not hash to what they claim."""

    def __init__(self, hostile: Hostile) -> None:
        self.hostile = hostile

    def outgoing(self, session: Session, messages: list[Message]) -> list[Message]:
        return [self.hostile.forge(m) for m in messages]


def _founded(tmp_path: Path) -> tuple[Device, Device, int, str]:
    """The hostile device founds a share of two files and invites the victim; beside
    them an ``outside`` folder holding a sentinel, which nothing may touch."""
    hostile, victim = Device(tmp_path, "hostile"), Device(tmp_path, "victim")
    hostile.root.mkdir()
    (hostile.root / "f").write_bytes(os.urandom(300_000))
    (hostile.root / "g").write_bytes(b"gee")
    (tmp_path / OUTSIDE).mkdir()
    (tmp_path / OUTSIDE / SENTINEL).write_bytes(SENTINEL_BYTES)
    hostile.run("init", str(hostile.root))
    port = free_port()
    return hostile, victim, port, invite(hostile, f"127.0.0.1:{port}")


def _join(victim: Device, token: str) -> subprocess.CompletedProcess[str]:
    """The real CLI's join, every deadline a tenth (a hang fails the test at
    JOIN_BOUND_S)."""
    try:
        joined = subprocess.run(
            victim.command("join", token, str(victim.root)),
            env={**victim.env, "BACKER_TIME_SCALE": SCALE},
            capture_output=True,
            text=True,
            timeout=JOIN_BOUND_S,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the join still ran after {JOIN_BOUND_S} s: {exc.stderr!r}") from exc
    return joined


def _beside(tmp_path: Path) -> list[str]:
    """What lies beside the two devices' folders and homes."""
    return sorted(os.listdir(tmp_path))


@pytest.mark.parametrize("tactic", [PingsOnly, ReplaysEvents])
def test_R54_a_join_leaves_an_inviter_that_keeps_it_open_without_catching_it_up(
    tmp_path: Path, tactic: type[Tactic]
) -> None:
    """A peer that answers with pings, or with the same events again and again, kept a
    join (any one-shot sync) running for ever: each message reset the silence deadline.
    Only a catch-up that moves on holds the session open now."""
    hostile, victim, port, token = _founded(tmp_path)
    with HostileMember(hostile.root, hostile.home, tactic()).running(port):
        joined = _join(victim, token)
    assert joined.returncode == 1, joined.stderr
    lines = joined.stderr.strip().splitlines()
    assert "peer unresponsive: its catch-up did not move" in lines[-1]
    assert "Traceback" not in joined.stderr
    assert not [p for p in os.listdir(victim.root) if p != ".backer"]
    assert _beside(tmp_path) == sorted(
        ["hostile", "hostile-home", "victim", "victim-home", OUTSIDE]
    )


def test_R56_a_join_ends_without_the_inviters_acknowledgement_of_nothing(
    tmp_path: Path,
) -> None:
    """An inviter that gave everything but never acknowledged (Done) kept the join
    running for ever, though the joiner had sent it nothing to acknowledge; the join
    now ends one idle deadline after it has everything."""
    hostile, victim, port, token = _founded(tmp_path)
    with HostileMember(hostile.root, hostile.home, NeverAcknowledges()).running(port):
        joined = _join(victim, token)
    assert joined.returncode == 0, joined.stderr
    assert "Traceback" not in joined.stderr
    assert snapshot(victim.root) == snapshot(hostile.root)


@pytest.mark.parametrize(
    ("craft", "exit_status", "said"),
    [
        ("bad_path", 1, "rejected events"),  # '../outside/pwn', refused before storing
        ("spoof", 0, ""),  # a version under another's name: it is the member's own
        ("lying_size", 3, "error: f:"),  # a size its content does not have: not written
        ("escape_link", 0, ""),  # a link out of the share and files recorded through it
        ("tamper", 1, "malformed manifest"),  # manifests and chunks that do not hash
    ],
)
def test_a_join_from_a_hostile_inviter_writes_nothing_outside_and_no_unverified_byte(
    tmp_path: Path, craft: str, exit_status: int, said: str
) -> None:
    hostile, victim, port, token = _founded(tmp_path)
    outside = snapshot(tmp_path / OUTSIDE)
    member = Hostile(0, b"")
    with HostileMember(hostile.root, hostile.home, Forges(member)).running(port) as peer:
        assert peer.share is not None
        member.device = peer.share.device
        peer.call(lambda: member.craft(peer.share, craft, 0, [peer.share.device]))
        joined = _join(victim, token)
    assert joined.returncode == exit_status, joined.stderr
    assert said in joined.stderr
    assert "Traceback" not in joined.stderr
    assert snapshot(tmp_path / OUTSIDE) == outside
    assert _beside(tmp_path) == sorted(
        ["hostile", "hostile-home", "victim", "victim-home", OUTSIDE]
    )
    sent = {"f": (hostile.root / "f").read_bytes(), "g": b"gee"}
    for path, entry in snapshot(victim.root).items():
        if entry[0] == "file":  # every file written is one the inviter holds, verified
            assert entry[1] in sent.values(), path


def _founder_and_member(tmp_path: Path, name: str) -> tuple[Device, Device, int, str]:
    """A founder's share holding ``kept``, and a device ``name`` that joined it over
    the port returned (the founder's node stopped again), with the token it used."""
    founder, member = Device(tmp_path, "founder"), Device(tmp_path, name)
    founder.root.mkdir()
    (founder.root / "kept").write_bytes(b"founder's")
    founder.run("init", str(founder.root))
    port = free_port()
    token = invite(founder, f"127.0.0.1:{port}")
    with founder.serving(port):
        member.run("join", token, str(member.root))
    return founder, member, port, token


def test_a_removed_member_cannot_push_events_to_a_node_or_come_back_with_its_invite(
    tmp_path: Path,
) -> None:
    """The removed device keeps its key, its old share key and the invite it joined
    with: the node refuses it every way, and records nothing it sends."""
    founder, removed, port, token = _founder_and_member(tmp_path, "removed")
    device = removed.run("status", "--dir", str(removed.root)).stdout.split("device")[1].split()[0]
    founder.run("device", "remove", device[:7], "--dir", str(founder.root))
    (removed.root / "kept").write_bytes(b"overwritten by the removed device")
    removed.run("scan", "--dir", str(removed.root))
    node = founder.start(port)
    try:
        peer = HostileMember(removed.root, removed.home, Tactic())
        with peer.running():
            reason = peer.dial(node.address)
        assert "removed" in reason, reason
        again = removed.run("join", token, str(tmp_path / "again"), check=False)
        assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr
    finally:
        node.stop()
    assert (founder.root / "kept").read_bytes() == b"founder's"
    assert "Traceback" not in node.log


def test_R55_a_repair_refuses_a_history_founded_by_another_device_under_the_shares_id(
    tmp_path: Path,
) -> None:
    """A share's id is only a name its GENESIS event carries. A device that knows the
    share key (a removed one that still has the key this device presents) founded a
    share of that id, admitted the repairing device and served it: the repair took it,
    and the device was from then on in that device's share (its files sent there). The
    founder the device home remembers must found the history given back."""
    founder, victim, port, _ = _founder_and_member(tmp_path, "victim")
    (victim.root / "mine").write_bytes(b"the victim's own file")
    victim.run("scan", "--dir", str(victim.root))
    known = recovery.share_at(victim.home, victim.root)
    assert known is not None
    impostor_home, impostor_root = tmp_path / "impostor-home", tmp_path / "impostor"
    impostor_root.mkdir()
    impostor = Share.create(
        impostor_root,
        load_or_create_key(impostor_home),
        joining=(known.share_id, known.share_key),
    )
    impostor._append(EventKind.GENESIS, genesis_payload(known.share_id, "impostor"))
    impostor.admit(bytes(load_or_create_key(victim.home).verify_key), "victim")
    (impostor_root / "planted").write_bytes(b"the impostor's file")
    impostor.scan()
    impostor.close()
    shutil.rmtree(victim.root / ".backer")  # lost
    before = snapshot(victim.root)
    with HostileMember(impostor_root, impostor_home, Tactic()).running(port):
        repaired = victim.run("repair", "--from", f"127.0.0.1:{port}", check=False)
    assert repaired.returncode == 1, repaired.stdout + repaired.stderr
    assert "another share" in repaired.stderr.strip().splitlines()[-1]
    assert "Traceback" not in repaired.stderr
    assert snapshot(victim.root) == before
    with founder.serving(port) as address:  # the share's own history is taken
        victim.run("repair", "--from", address)
    assert snapshot(victim.root) == before


class PushesOnce(Tactic):
    """An honest session, plus one crafted Events message right after its Summary."""

    def __init__(self, craft: Callable[[Share], Message]) -> None:
        self.craft = craft
        self.sent = False

    def outgoing(self, session: Session, messages: list[Message]) -> list[Message]:
        if self.sent or not any(isinstance(m, Summary) for m in messages):
            return messages
        self.sent = True
        return [*messages, self.craft(session.share)]


def _tampered(share: Share) -> Events:
    """The member's next event with one bit of its body flipped."""
    raw = bytearray(share.rename_device(share.device, f"renamed {os.urandom(4).hex()}").raw)
    raw[-70] ^= 1
    return Events(b"", [bytes(raw)], 0)


def _skipping(share: Share) -> Events:
    """The third of the member's next three events, alone."""
    made = [share.rename_device(share.device, f"name {os.urandom(4).hex()}") for _ in range(3)]
    return Events(b"", [made[2].raw], 0)


def _a_strangers(share: Share) -> Events:
    """The GENESIS of a share of this id, signed by a device that is no member."""
    stranger = nacl.signing.SigningKey.generate()
    payload = genesis_payload(share.share_id, "stranger")
    event = Event.create(stranger, 0, NO_PREVIOUS, 1, EventKind.GENESIS, payload)
    return Events(b"", [event.raw], 0)


@pytest.mark.parametrize(
    ("craft", "reason"),
    [
        (_tampered, "bad signature"),
        (_skipping, "gap in log"),
        (_a_strangers, "is not a member"),
    ],
)
def test_a_node_closes_a_member_session_pushing_forged_events_and_serves_on(
    tmp_path: Path, craft: Callable[[Share], Events], reason: str
) -> None:
    founder, member, port, _ = _founder_and_member(tmp_path, "member")
    node = founder.start(port)
    try:
        member.sync(node.address)
        with HostileMember(member.root, member.home, PushesOnce(craft)).running() as peer:
            closed = peer.dial(node.address)
        assert "rejected events" in closed and reason in closed, closed
        (founder.root / "later").write_bytes(b"after the attack")
        member.sync(node.address)
    finally:
        node.stop()
    assert (member.root / "later").read_bytes() == b"after the attack"
    assert (founder.root / "kept").read_bytes() == b"founder's"
    assert "Traceback" not in node.log


def _memory_mib(pid: int, field: str = "VmHWM") -> float:
    """A process's peak resident memory (``VmHWM``), or its current one (``VmRSS``)."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024


def test_R58_a_chunks_message_of_two_million_empty_chunks_costs_a_node_no_memory(
    tmp_path: Path,
) -> None:
    """Each chunk of a Chunks message is decoded as a view of the frame (~184 bytes),
    and their number was bounded by the frame alone: one 8 MiB message of 2,097,149
    empty chunks took a node to ~650 MiB more before the session saw that none was
    asked for, again at each message. A Chunks message holds at most what one request
    asks (64): more is refused as the count is read."""
    founder, member, port, _ = _founder_and_member(tmp_path, "member")
    node = founder.start(port)
    try:
        before = _memory_mib(node.process.pid)
        empty = Chunks([], [b""] * ((MAX_FRAME - 9) // 4))  # (type, two counts: 9 bytes)
        with HostileMember(member.root, member.home, PushesOnce(lambda _: empty)).running() as peer:
            closed = peer.dial(node.address)
        grown = _memory_mib(node.process.pid) - before
        (founder.root / "later").write_bytes(b"after the attack")
        member.sync(node.address)
    finally:
        node.stop()
    assert grown < 64, f"the node's peak grew by {grown:.0f} MiB"
    assert "list of 2097149 items: at most 64 can be sent" in closed, closed
    assert (member.root / "later").read_bytes() == b"after the attack"


class FloodsThenBreaks(Tactic):
    """After its Summary: ``count`` Events messages of one run that never ends (64 KiB
    events, 8 MiB a message, nothing verified before the run's end), then a malformed
    one, so that the node closes the session with all of them buffered."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.sent = False

    def outgoing(self, session: Session, messages: list[Message]) -> list[Message]:
        if self.sent or not any(isinstance(m, Summary) for m in messages):
            return messages
        self.sent = True
        real = session.share.rename_device(session.share.device, "flooding").raw
        events = [real, *[bytes(64 << 10)] * 126, real]
        return [*messages, *[Events(b"", events, 1)] * self.count, Events(b"", [], 0)]


def test_a_node_hands_back_what_a_members_ended_session_buffered(tmp_path: Path) -> None:
    """56 MiB of events buffered by a member's session stayed in the node after the
    session ended: the progress task's loop still named the last link (and its session),
    and glibc kept the pages freed. The node returns to near its idle RSS."""
    founder, member, port, _ = _founder_and_member(tmp_path, "member")
    node = founder.start(port)
    try:
        member.sync(node.address)
        rss = lambda: _memory_mib(node.process.pid, "VmRSS")  # noqa: E731
        idle = rss()
        with HostileMember(member.root, member.home, FloodsThenBreaks(7)).running() as peer:
            closed = peer.dial(node.address)
        assert "Events message" in closed, closed
        node.wait_for("session with", count=4)  # (its end logged: the release follows)
        deadline = time.monotonic() + 60
        while (after := rss()) > idle + 24 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert after <= idle + 24, (idle, after)
        member.sync(node.address)
    finally:
        node.stop()
    assert "Traceback" not in node.log


def test_R70_a_node_closes_a_session_whose_event_run_never_ends(tmp_path: Path) -> None:
    """Events a member's session sends are held unverified until their run ends (a
    message with ``more`` 0): a member that began a run and never ended it, while it
    pinged, held what it had sent (up to 256 MiB) for as long as it liked. The node now
    closes such a session once the run has waited ``run_s`` (6 s here), and serves on.
    (The run's author is made up: nothing is checked before the run ends.)"""
    founder, member, port, _ = _founder_and_member(tmp_path, "member")
    (member.root / "new").write_bytes(b"the member's, synced after the attack")
    member.run("scan", "--dir", str(member.root))
    stranger = nacl.signing.SigningKey.generate()
    begun = Event.create(stranger, 0, NO_PREVIOUS, 1, EventKind.STATE, bytes(1 << 20))
    node = founder.start(port, BACKER_TIME_SCALE=ACK_SCALE)
    try:
        never_ends = PushesOnce(lambda _: Events(b"", [begun.raw], 1))
        with HostileMember(member.root, member.home, never_ends).running() as peer:
            closed = peer.dial(node.address, timeout=60)
        assert "awaited the end of their run for 6 s" in closed, closed
        member.sync(node.address)
    finally:
        node.stop()
    assert (founder.root / "new").read_bytes() == b"the member's, synced after the attack"
    assert "Traceback" not in node.log


class AnswersLackingOneAtATime(Tactic):
    """Asked for chunks it holds, answers that it lacks one of them every ``every``
    seconds, and nothing else of them: it gives nothing and is never silent for long."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.asked: list[bytes] = []
        self.last = time.monotonic()

    def incoming(self, session: Session, message: Message) -> list[Message] | None:
        if isinstance(message, WantChunks):
            self.asked += message.hashes
            return []
        return None

    def outgoing(self, session: Session, messages: list[Message]) -> list[Message]:
        if self.asked and time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            messages = [*messages, Chunks([self.asked.pop(0)], [b""])]
        return messages


def test_R71_a_member_that_holds_back_chunks_is_cut_not_the_peer_waiting_on_it(
    tmp_path: Path,
) -> None:
    """b waits for a file's chunks that only the member c holds; c answers, every 2 s,
    that it lacks one of them. Each answer restarted b's clock for its requests, so b
    never gave up on c, and its window (with a's file, written meanwhile) waited for
    good: a's node, its events unacknowledged and b saying nothing but pings, cut b at
    its acknowledgement deadline (here 12 s, 240 s unscaled), again at each of its
    changes while b's next plan waited on c the same way. Now
    an answer that gives nothing does not restart the clock, so b cuts c (6 s), and a
    waiting b tells a what it still needs instead of pinging."""
    founder, b, port, _ = _founder_and_member(tmp_path, "b")
    c = Device(tmp_path, "c")
    token = invite(founder, f"127.0.0.1:{port}")
    with founder.serving(port) as address:
        c.run("join", token, str(c.root))
        b.sync(address)  # b learns that c is a member
    (c.root / "held back").write_bytes(os.urandom(1 << 20))  # ~16 chunks
    c.run("scan", "--dir", str(c.root))
    a_node = founder.start(port, BACKER_TIME_SCALE=ACK_SCALE)
    b_node = b.start(BACKER_TIME_SCALE=ACK_SCALE)
    tactic = AnswersLackingOneAtATime(2.0)
    closed: list[str] = []
    try:
        b_node.wait_for("session with")
        with HostileMember(c.root, c.home, tactic).running() as peer:
            dialling = threading.Thread(
                target=lambda: closed.append(peer.dial(b_node.address, timeout=40)), daemon=True
            )
            dialling.start()
            deadline = time.monotonic() + 60
            while len(tactic.asked) < 8 and time.monotonic() < deadline:  # b's window waits
                time.sleep(0.05)  # on c: 16 s of answers to come, one every 2 s
            (founder.root / "note").write_bytes(b"a's, while b waits on c")
            deadline = time.monotonic() + 60
            while not (b.root / "note").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            dialling.join(60)
    finally:
        b_node.stop()
        a_node.stop()
    assert "not acknowledged" not in a_node.log, a_node.log
    assert (b.root / "note").read_bytes() == b"a's, while b waits on c"
    assert closed and "no answer to a request for 6 s" in closed[0], closed
    assert not (b.root / "held back").exists()


class TakesEventsSilently(Tactic):
    """Takes whatever events it is sent without storing them, and never acknowledges
    them (no Done); it only keeps the connection alive."""

    def outgoing(self, session: Session, messages: list[Message]) -> list[Message]:
        return [m for m in messages if not isinstance(m, Done)]

    def incoming(self, session: Session, message: Message) -> list[Message] | None:
        return [] if isinstance(message, Events) else None


ACK_SCALE = "0.05"  # the acknowledgement's deadline 12 s, the idle one 3 s


def test_a_sync_ends_when_its_peer_never_acknowledges_the_events_sent_to_it(
    tmp_path: Path,
) -> None:
    """A peer that took the events a sync sent and then only pinged kept the sync
    running for ever: it ends with one line and status 1, and loses nothing (the next
    sync with an honest peer brings the file)."""
    founder, member, port, _ = _founder_and_member(tmp_path, "member")
    (member.root / "new").write_bytes(b"the member's new file")
    with HostileMember(founder.root, founder.home, TakesEventsSilently()).running(port):
        try:
            synced = subprocess.run(
                member.command("sync", f"127.0.0.1:{port}", "--dir", str(member.root)),
                env={**member.env, "BACKER_TIME_SCALE": ACK_SCALE},
                capture_output=True,
                text=True,
                timeout=JOIN_BOUND_S,
            )
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"the sync still ran after {JOIN_BOUND_S} s") from exc
    assert synced.returncode == 1, synced.stdout + synced.stderr
    assert "not acknowledged" in synced.stderr.strip().splitlines()[-1], synced.stderr
    assert "Traceback" not in synced.stderr
    assert not (founder.root / "new").exists()
    with founder.serving(port) as address:
        member.sync(address)
    assert (founder.root / "new").read_bytes() == b"the member's new file"


def test_a_node_closes_a_session_whose_peer_never_acknowledges_its_events(
    tmp_path: Path,
) -> None:
    """A member that took a node's events and then only pinged held its session (a
    slot, whatever it had buffered) as long as it liked: the node closes it with the
    reason and serves on."""
    founder, member, port, _ = _founder_and_member(tmp_path, "member")
    (founder.root / "later").write_bytes(b"recorded while the member was away")
    node = founder.start(port, BACKER_TIME_SCALE=ACK_SCALE)
    try:
        with HostileMember(member.root, member.home, TakesEventsSilently()).running() as peer:
            closed = peer.dial(node.address, timeout=JOIN_BOUND_S)
        assert "not acknowledged" in closed, closed
        member.sync(node.address)
    finally:
        node.stop()
    assert (member.root / "later").read_bytes() == b"recorded while the member was away"
    assert "Traceback" not in node.log
