"""A catch-up costs a bounded amount of memory, however large the journal and however
many authors a peer claims (docs/security.md, "Resource limits")."""

from __future__ import annotations

import os
import time
import tracemalloc
from pathlib import Path

import nacl.signing
import pytest

from backer.model.membership import MAX_MEMBERS, EventKind
from backer.protocol.session import Session
from backer.protocol.wire import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    CaughtUp,
    Events,
    FrameReader,
    Hello,
    ProtocolError,
    Summary,
)
from journal import Checkpoint, Journal
from tests.helpers import make_devices

EVENTS = 100_000  # (before 50a6459 a catch-up of this many peaked at 70 MiB)
CATCH_UP_BOUND = 24 * 1024 * 1024  # bytes: a page of the journal and one budget of output
BUDGET = 4 * 1024 * 1024  # what the transport asks for at a time (Limits.reply_bytes)


def test_a_catch_up_of_100000_events_is_built_as_the_peer_reads_it(tmp_path: Path) -> None:
    """A fresh peer (empty Summary) of a 100,000-event journal of three authors gets all
    of it; the serving session never holds more than ``CATCH_UP_BOUND`` (it held every
    message of the catch-up before it sent the first: ~3 copies of the journal)."""
    (a,) = make_devices(tmp_path, 1)
    keys = [a.key] + [nacl.signing.SigningKey.generate() for _ in range(2)]
    for n, key in enumerate(keys[1:]):
        a.admit(bytes(key.verify_key), f"other{n}")
    rounds = [(keys[0], 2000), (keys[1], 1000), (keys[2], 500)]  # a message's worth, and less
    while a.journal.count() < EVENTS:
        for key, count in rounds:
            a.journal.append(key, [(EventKind.CLIENT, os.urandom(16)) for _ in range(count)])
    receiver = Journal(tmp_path / "receiver.db")
    reader = FrameReader()
    run: list[bytes] = []
    caught_up = False
    tracemalloc.start()
    try:
        session = Session(a, "a")
        session.lazy = True
        session.outbox[:0] = session.start()
        session.take_outbox()
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        replies = session.receive(Hello(PROTOCOL_VERSION, b"fresh"))
        replies += session.receive(Summary([], 0))
        started = time.monotonic()
        while time.monotonic() - started < 600:
            for message in reader.feed(b"".join(m.encode() for m in replies)):
                assert not caught_up
                if isinstance(message, CaughtUp):
                    caught_up = True
                    continue
                assert isinstance(message, Events) and len(message.encode()) < MAX_FRAME
                run += message.events
                if not message.more:
                    checkpoint = Checkpoint.decode(message.checkpoint)
                    receiver.ingest(run, checkpoint, lambda author: True)
                    run = []
            replies = session.take_outbox(BUDGET)
            if not replies:
                break
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert caught_up and not run and not session.backlog
    assert receiver.count() == a.journal.count() >= EVENTS
    assert receiver.summary() == a.journal.summary()
    assert peak < CATCH_UP_BOUND, f"{peak >> 20} MiB"
    print(f"catch-up of {receiver.count()} events: peak {peak / 2**20:.1f} MiB")


def test_a_long_run_of_one_author_is_taken_in_at_its_checkpoints(tmp_path: Path) -> None:
    """One author's 20,000 events, signed 2,000 at a time, reach a fresh peer as ten
    runs, each ending at a checkpoint the author signed and each verified and applied
    alone: a new device used to receive the founder's whole log (1,000,000 files) as one
    run, applied in one call that held its event loop for minutes."""
    (a,) = make_devices(tmp_path, 1)
    appended = 0
    while appended < 20_000:
        a.journal.append(a.key, [(EventKind.CLIENT, os.urandom(16)) for _ in range(2000)])
        appended += 2000
    session = Session(a, "a")
    session.lazy = True
    session.outbox[:0] = session.start()
    session.take_outbox()
    messages = session.receive(Hello(PROTOCOL_VERSION, b"fresh"))
    messages += session.receive(Summary([], 0)) + session.take_outbox(BUDGET)
    runs: list[int] = []
    run = 0
    while messages:
        for message in messages:
            if isinstance(message, Events):
                run += len(message.events)
                if not message.more:
                    assert message.checkpoint, "a run ends with the author's checkpoint"
                    runs.append(run)
                    run = 0
        messages = session.take_outbox(BUDGET)
    assert sum(runs) == a.journal.count() and max(runs) <= 2000, runs


def test_R70_an_append_larger_than_a_message_is_sent_as_runs_of_one_message(
    tmp_path: Path,
) -> None:
    """One append of 5,000 events (a prune announcing 10,000,000 contents no longer held
    is 5,000 UNHELD events) has one checkpoint, at its end: it reached a peer as one run
    over three messages, which the peer held unverified until the last. Each message now
    ends its run, without a checkpoint where the author signed none (the peer checks each
    event's own signature), and the peer takes all of it in."""
    (a,) = make_devices(tmp_path, 1)
    a.journal.append(a.key, [(EventKind.CLIENT, os.urandom(16)) for _ in range(5000)])
    session = Session(a, "a")
    session.lazy = True
    session.outbox[:0] = session.start()
    session.take_outbox()
    messages = session.receive(Hello(PROTOCOL_VERSION, b"fresh"))
    messages += session.receive(Summary([], 0)) + session.take_outbox(BUDGET)
    receiver = Journal(tmp_path / "receiver.db")
    runs: list[tuple[int, bool]] = []
    while messages:
        for message in messages:
            if isinstance(message, Events):
                assert not message.more, "a run spans messages"
                signed = Checkpoint.decode(message.checkpoint) if message.checkpoint else None
                receiver.ingest(message.events, signed, lambda author: True)
                runs.append((len(message.events), signed is not None))
        messages = session.take_outbox(BUDGET)
    assert runs[-3:] == [(2000, False), (2000, False), (1000, True)], runs
    assert receiver.summary() == a.journal.summary()


def _claims(count: int, signed: int) -> list[bytes]:
    """Checkpoints of ``count`` distinct authors, the first ``signed`` validly signed."""
    claims = []
    for n in range(count):
        if n < signed:
            key = nacl.signing.SigningKey.generate()
            claims.append(Checkpoint.create(key, 1, os.urandom(32)).encode())
        else:
            claims.append(Checkpoint(os.urandom(32), 1, os.urandom(32), os.urandom(64)).encode())
    return claims


def test_finding_14_a_summary_after_a_flood_of_authors_is_refused_past_the_member_cap(
    tmp_path: Path,
) -> None:
    """100,000 claimed authors in parts: refused at the first one past what a share can
    hold, having checked and kept at most ``MAX_MEMBERS`` (it decoded and verified every
    claim once the last part came: ~470,000 in a 64 MiB summary)."""
    (a,) = make_devices(tmp_path, 1)
    claims = _claims(100_000, MAX_MEMBERS + 1)
    parts = [
        Summary(claims[start : start + 20_000], int(start + 20_000 < len(claims)))
        for start in range(0, len(claims), 20_000)
    ]
    session = Session(a, "a")
    session.receive(Hello(PROTOCOL_VERSION, b"flood"))
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=f"more than {MAX_MEMBERS} authors"):
            for part in parts:
                session.receive(part)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(session.peer_summary) == MAX_MEMBERS
    assert peak < 2 * 1024 * 1024, f"{peak >> 10} KiB"


def test_a_summary_naming_an_author_twice_is_refused(tmp_path: Path) -> None:
    (a,) = make_devices(tmp_path, 1)
    (claim,) = _claims(1, 1)
    session = Session(a, "a")
    session.receive(Hello(PROTOCOL_VERSION, b"twice"))
    session.receive(Summary([claim], 1))
    with pytest.raises(ProtocolError, match="an author twice"):
        session.receive(Summary([claim], 0))
