"""Honest data never hits the frame limit: large manifests, many manifests, many authors."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

import backer.model.share
import backer.protocol.session
from backer.model.membership import EventKind
from backer.protocol.session import Session
from backer.protocol.wire import MAX_FRAME, ManifestPart, Manifests, Summary, WantManifests
from backer.scanner.content import MAX_CHUNK, MIN_CHUNK, ChunkRef, Manifest
from journal import Event
from tests.helpers import exchange, make_devices, sync


def _manifest(count: int, seed: int) -> Manifest:
    rng = random.Random(seed)
    chunks, offset = [], 0
    for _ in range(count):
        length = rng.randint(MIN_CHUNK, MAX_CHUNK)
        chunks.append(ChunkRef(rng.randbytes(32), offset, length))
        offset += length
    return Manifest(tuple(chunks))


def test_finding_13_manifests_larger_than_a_frame_cross_a_session(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    left, right = sync(a, b)
    huge = _manifest(300_000, 1)  # a ~40 GB file: 10.8 MB of manifest
    many = [_manifest(500, n) for n in range(2, 502)]  # 500 files of ~65 MB: 9 MB
    for manifest in (huge, *many):
        a.catalog.put_manifest_bodies([manifest])
    wanted = [m.id for m in (*many[:250], huge, *many[250:])]
    for manifest_id in wanted:  # as b's replicator does when it asks
        right.replicator.manifests_asked[manifest_id] = right
    right.manifests_in_flight = len(wanted)
    sent = []
    for start in range(0, len(wanted), 500):
        request = WantManifests(wanted[start : start + 500])
        replies = left.receive(request)
        sent += replies
        exchange(left, right, replies, [])
    assert max(len(m.encode()) for m in sent) < MAX_FRAME
    assert sum(isinstance(m, ManifestPart) for m in sent) == 3
    assert sum(isinstance(m, Manifests) for m in sent) >= 3
    assert not right.replicator.manifests_asked and right.receiving_part is None
    for manifest in (huge, *many):
        assert b.catalog.manifest(manifest.id) == manifest


def test_finding_13_a_summary_of_many_authors_is_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Summary parts are cut by bytes; with a limit below two checkpoints, one each."""
    monkeypatch.setattr(backer.protocol.session, "REPLY_BYTES", 200)
    a, b, c = make_devices(tmp_path, 3)
    (c.root / "from-c.txt").write_text("c")
    sync(a, b)
    sync(a, c)
    (b.root / "from-b.txt").write_text("b")
    sync(a, b)
    summaries = [m for m in Session(a, "a").start() if isinstance(m, Summary)]
    authors = len(a.journal.summary())
    assert authors >= 2 and [m.more for m in summaries] == [1] * (authors - 1) + [0]
    sync(a, c)
    assert (c.root / "from-b.txt").read_text() == "b"


def _resolve_conflicts(tmp_path: Path, count: int) -> list[Event]:
    """``count`` paths that are links to different targets on two devices, synced: every
    conflict resolved alike on both; returns the resolution events b recorded."""
    a, b = make_devices(tmp_path, 2)
    sync(a, b)
    for share, target in ((a, "from-a"), (b, "from-b")):
        (share.root / "d").mkdir()
        for n in range(count):
            os.symlink(target, share.root / "d" / f"l{n}")
        share.scan()
    before = b.journal.length(b.device)  # after b's own scan
    _, right = sync(a, b)
    assert right.replicator.stats.conflicts_resolved >= count  # and the directory d
    assert a.catalog.conflicted_paths() == b.catalog.conflicted_paths() == []
    names = sorted(os.listdir(a.root / "d"))
    assert len(names) == 2 * count and names == sorted(os.listdir(b.root / "d"))
    return [e for e in b.journal.events(b.device, before) if e.kind == EventKind.STATE]


def test_finding_13_many_conflicts_resolve_in_events_that_fit_a_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One event per RESOLUTIONS_PER_EVENT paths (2,000: ~320 KB); with 100 here, 1,000
    conflicts take ten events, as 100,000 take fifty."""
    monkeypatch.setattr(backer.model.share, "RESOLUTIONS_PER_EVENT", 100)
    resolutions = _resolve_conflicts(tmp_path, 1000)
    assert len(resolutions) >= 1000 // 100
    assert max(len(e.raw) for e in resolutions) < 100 * 400


@pytest.mark.skipif(
    not os.environ.get("BACKER_LARGE_TESTS"), reason="about 10 min: BACKER_LARGE_TESTS=1"
)
def test_finding_13_100000_conflicts_sync(tmp_path: Path) -> None:
    """The issue's number itself, at the real RESOLUTIONS_PER_EVENT (measured in
    docs/security.md)."""
    resolutions = _resolve_conflicts(tmp_path, 100_000)
    per_event = backer.model.share.RESOLUTIONS_PER_EVENT
    assert len(resolutions) >= 100_000 // per_event
    assert max(len(e.raw) for e in resolutions) < min(per_event * 400, MAX_FRAME // 2)


def test_serving_small_manifests_reads_them_500_at_a_time(tmp_path: Path) -> None:
    """A first sync of 100,000 small files asks for 100,000 manifests: the serving side
    looked each up with a query of its own. Now one query reads a request's run of small
    ones; a large one is still read alone (and still sent in parts), a missing one empty."""
    a, b = make_devices(tmp_path, 2)
    left, right = sync(a, b)
    small = [_manifest(1, n) for n in range(1_000, 2_000)]
    large = _manifest(40_000, 3)  # ~1.4 MB: read alone, never in a batch
    for manifest in (*small, large):
        a.catalog.put_manifest_bodies([manifest])
    missing = _manifest(1, 4).id
    wanted = [m.id for m in small[:400]] + [large.id, missing] + [m.id for m in small[400:]]
    for manifest_id in wanted:
        right.replicator.manifests_asked[manifest_id] = right
    right.manifests_in_flight = len(wanted)
    queries: list[str] = []
    a.db.conn.set_trace_callback(queries.append)
    try:
        for start in range(0, len(wanted), 500):
            replies = left.receive(WantManifests(wanted[start : start + 500]))
            exchange(left, right, replies, [])
    finally:
        a.db.conn.set_trace_callback(None)
    reads = [q for q in queries if "FROM manifests" in q]
    assert len(reads) <= 8, len(reads)
    assert set(right.replicator.manifests_asked) == set()
    for manifest in (*small, large):
        assert b.catalog.manifest(manifest.id) == manifest
