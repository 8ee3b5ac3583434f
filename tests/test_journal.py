"""Journal properties: tampering is rejected, ingest is idempotent and order-free,
forks are detected, and catch-up sends exactly what a peer lacks."""

from __future__ import annotations

import uuid
from pathlib import Path

import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from journal import Checkpoint, CorruptJournal, Event, Journal, Range, RejectedBatch, store

ANYONE = lambda author: True  # noqa: E731
SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def make_log(key: nacl.signing.SigningKey, tmp: Path, sizes: list[int]) -> Journal:
    """A journal holding one author's log appended in batches of ``sizes``."""
    journal = Journal(tmp / f"log-{uuid.uuid4().hex}.db")
    counter = 0
    for size in sizes:
        entries = [(3, f"payload {counter + i}".encode()) for i in range(size)]
        counter += size
        journal.append(key, entries, time_ms=1_700_000_000_000 + counter)
    return journal


def dump(journal: Journal) -> list[tuple[bytes, int, bytes]]:
    rows = journal.conn.execute(
        "SELECT a.key, e.seq, e.raw FROM events e JOIN authors a ON a.id = e.author "
        "ORDER BY a.key, e.seq"
    )
    return list(rows)


def flip(data: bytes, index: int, bit: int) -> bytes:
    mutable = bytearray(data)
    mutable[index % len(mutable)] ^= 1 << bit
    return bytes(mutable)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Journal, list[Event], Checkpoint]:
    key = nacl.signing.SigningKey.generate()
    journal = make_log(key, tmp_path_factory.mktemp("src"), [1, 5, 20])
    author = bytes(key.verify_key)
    return journal, list(journal.events(author)), journal.summary()[author]


@SETTINGS
@given(
    which=st.integers(min_value=0, max_value=25),
    index=st.integers(min_value=0, max_value=10_000),
    bit=st.integers(min_value=0, max_value=7),
    with_checkpoint=st.booleans(),
)
def test_any_flipped_byte_in_a_received_event_is_rejected(
    source, tmp_path: Path, which: int, index: int, bit: int, with_checkpoint: bool
) -> None:
    _, events, checkpoint = source
    raws = [e.raw for e in events]
    raws[which] = flip(raws[which], index, bit)
    receiver = Journal(tmp_path / f"r-{uuid.uuid4().hex}.db")
    with pytest.raises(RejectedBatch):
        receiver.ingest(raws, checkpoint if with_checkpoint else None, ANYONE)
    assert receiver.count() == 0


@SETTINGS
@given(index=st.integers(min_value=0, max_value=200), bit=st.integers(min_value=0, max_value=7))
def test_any_flipped_byte_in_a_checkpoint_is_rejected(
    source, tmp_path: Path, index: int, bit: int
) -> None:
    _, events, checkpoint = source
    forged = flip(checkpoint.encode(), index, bit)
    receiver = Journal(tmp_path / f"r-{uuid.uuid4().hex}.db")
    try:
        bad = Checkpoint.decode(forged)
    except ValueError:
        return  # rejected at decoding already
    with pytest.raises(RejectedBatch):
        receiver.ingest([e.raw for e in events], bad, ANYONE)
        if receiver.count():  # a checkpoint for another author falls back to per-event checks
            raise RejectedBatch("stored under a forged checkpoint")
    assert receiver.count() == 0


@SETTINGS
@given(
    which=st.integers(min_value=0, max_value=25),
    index=st.integers(min_value=0, max_value=10_000),
    bit=st.integers(min_value=0, max_value=7),
)
def test_any_flipped_byte_in_a_stored_event_is_detected(
    source, tmp_path: Path, which: int, index: int, bit: int
) -> None:
    _, events, checkpoint = source
    store = Journal(tmp_path / f"s-{uuid.uuid4().hex}.db")
    store.ingest([e.raw for e in events], checkpoint, ANYONE)
    assert store.verify() == len(events)
    raw = events[which].raw
    store.conn.execute("UPDATE events SET raw = ? WHERE seq = ?", (flip(raw, index, bit), which))
    store.conn.commit()
    with pytest.raises(CorruptJournal):
        store.verify()


@SETTINGS
@given(data=st.data())
def test_ingest_in_any_order_with_duplicates_gives_an_identical_store(tmp_path: Path, data) -> None:
    keys = [nacl.signing.SigningKey(bytes([n]) * 32) for n in (1, 2)]
    logs = [make_log(k, tmp_path, [3, 4]) for k in keys]
    batches = []
    for journal, k in zip(logs, keys, strict=True):
        author = bytes(k.verify_key)
        events = [e.raw for e in journal.events(author)]
        checkpoint = journal.summary()[author]
        for start in range(0, len(events), 2):
            batches.append((events[: start + 2], checkpoint if start + 2 >= len(events) else None))
    order = data.draw(
        st.permutations(batches + data.draw(st.lists(st.sampled_from(batches), max_size=4)))
    )
    reference = Journal(tmp_path / f"ref-{uuid.uuid4().hex}.db")
    shuffled = Journal(tmp_path / f"shuf-{uuid.uuid4().hex}.db")
    for raws, checkpoint in batches:
        reference.ingest(raws, checkpoint, ANYONE)
    for raws, checkpoint in order:
        # a batch whose start this store has not reached yet is refused whole: retry later
        try:
            shuffled.ingest(raws, checkpoint, ANYONE)
        except RejectedBatch as exc:
            assert "gap" in str(exc)
    for raws, checkpoint in batches:
        shuffled.ingest(raws, checkpoint, ANYONE)
    assert dump(shuffled) == dump(reference)
    assert {a: c.length for a, c in shuffled.summary().items()} == {
        a: c.length for a, c in reference.summary().items()
    }
    assert shuffled.verify() == reference.verify()


def test_non_member_is_rejected_and_nothing_stored(source, tmp_path: Path) -> None:
    _, events, checkpoint = source
    receiver = Journal(tmp_path / "r.db")
    with pytest.raises(RejectedBatch, match="not a member"):
        receiver.ingest([e.raw for e in events], checkpoint, lambda author: False)
    assert receiver.count() == 0


def test_catch_up_verifies_one_signature_per_batch(source, tmp_path: Path, monkeypatch) -> None:
    _, events, checkpoint = source
    calls = []
    monkeypatch.setattr(Event, "verify", lambda self: calls.append(self.seq))
    receiver = Journal(tmp_path / "r.db")
    result = receiver.ingest([e.raw for e in events], checkpoint, ANYONE)
    assert len(result.added) == len(events) and calls == []
    assert receiver.summary()[checkpoint.author] == checkpoint


def test_fork_is_detected_and_neither_branch_overwrites_the_other(tmp_path: Path, key) -> None:
    author = bytes(key.verify_key)
    ours = make_log(key, tmp_path, [3])
    theirs = Journal(tmp_path / "theirs.db")
    theirs.ingest([e.raw for e in ours.events(author, 0, 2)], None, ANYONE)
    theirs.append(key, [(3, b"a different third event")])
    forked = [e.raw for e in theirs.events(author)]
    result = ours.ingest(forked, theirs.summary()[author], ANYONE)
    assert [f.seq for f in result.forks] == [2]
    assert ours.forks()[0].theirs == forked[2]
    assert [e.raw for e in ours.events(author)][2] != forked[2]
    # the summaries alone reveal it too: same length, different signed roots
    ranges, forks = theirs.missing_for(ours.summary())
    assert ranges == [] and len(forks) == 1


def test_missing_for_lists_exactly_the_ranges_a_peer_lacks(tmp_path: Path) -> None:
    alice, bob = nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate()
    full = make_log(alice, tmp_path, [10])
    a, b = bytes(alice.verify_key), bytes(bob.verify_key)
    peer = Journal(tmp_path / "peer.db")
    peer.ingest([e.raw for e in full.events(a)], full.summary()[a], ANYONE)
    full.append(alice, [(3, bytes([n])) for n in range(30)])
    bob_log = make_log(bob, tmp_path, [7])
    full.ingest([e.raw for e in bob_log.events(b)], bob_log.summary()[b], ANYONE)
    ranges, forks = full.missing_for(Journal.check_summary(peer.summary().values()))
    assert forks == []
    assert sorted(ranges, key=lambda r: r.author) == sorted(
        [Range(a, 10, 40), Range(b, 0, 7)], key=lambda r: r.author
    )
    for r in ranges:
        raws = [e.raw for e in full.events(r.author, r.start, r.end)]
        peer.ingest(raws, full.summary()[r.author], ANYONE)
    assert full.missing_for(peer.summary()) == ([], [])
    assert peer.root_at(a, 17) == full.root_at(a, 17)


@pytest.mark.parametrize("length", [1, 5, 31, 32, 33, 64, 100, 129])
def test_root_at_any_length_matches_the_signed_root_at_that_length(
    tmp_path: Path, key, length: int
) -> None:
    journal = Journal(tmp_path / "j.db")
    roots = {}
    for n in range(1, 130):
        journal.append(key, [(3, n.to_bytes(4, "big"))])
        roots[n] = journal.summary()[bytes(key.verify_key)].root
    assert journal.root_at(bytes(key.verify_key), length) == roots[length]


def test_in_ranges_reads_the_journal_a_page_at_a_time_in_arrival_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages cut by count and by bytes (an event larger than a page still comes alone)
    give exactly the events of the ranges, in arrival order, also when the journal
    grows between pages."""
    monkeypatch.setattr(store, "PAGE_EVENTS", 3)
    monkeypatch.setattr(store, "PAGE_BYTES", 600)
    keys = [nacl.signing.SigningKey.generate() for _ in range(3)]
    log = Journal(tmp_path / "log.db")
    for round_ in range(6):
        for n, key in enumerate(keys):
            log.append(key, [(3, bytes(100 * (size + n + round_ % 2))) for size in range(4)])
    a, b, c = (bytes(key.verify_key) for key in keys)
    ranges = [Range(a, 3, 17), Range(b, 0, 24), Range(c, 22, 24)]
    wanted = [
        event
        for _, event in log.since()
        if any(r.author == event.author and r.start <= event.seq < r.end for r in ranges)
    ]
    pages = log.in_ranges(ranges)
    got = [next(pages) for _ in range(5)]
    log.append(keys[0], [(3, b"later")])  # not in the ranges: never read
    got += list(pages)
    assert got == wanted and len(wanted) == 14 + 24 + 2
    assert list(log.in_ranges([Range(a, 30, 40)])) == []
