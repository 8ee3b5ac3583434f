"""The node's pure rules: how long to wait before dialling again, and which of two
sessions with one device to keep."""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import psutil

from backer.config.identity import load_or_create_key
from backer.model.share import Share
from backer.node.node import (
    BACKOFF_CAP_S,
    DUPLICATE_WINDOW_S,
    Link,
    backoff,
    keeps_new,
)
from tests.e2e import joined_pair, nodes_in_loop


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    rng = random.Random(1)
    for attempt in range(40):
        ceiling = min(BACKOFF_CAP_S, 0.5 * 2**attempt)
        delays = [backoff(attempt, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, min(delays))
        assert max(delays) - min(delays) > ceiling / 4  # jittered, not in lockstep
    assert backoff(10_000, rng) <= BACKOFF_CAP_S  # no overflow however long it failed


def test_backoff_never_busy_loops_and_scales() -> None:
    rng = random.Random(2)
    assert min(backoff(0, rng) for _ in range(1000)) >= 0.25
    assert all(backoff(9, rng, scale=0.1) <= BACKOFF_CAP_S * 0.1 for _ in range(100))


def test_backoff_bounds_attempts_while_a_peer_is_down_30_s() -> None:
    rng = random.Random(3)
    waited, attempts = 0.0, 0
    while waited < 30:
        attempts += 1
        waited += backoff(attempts, rng)
    assert 4 <= attempts <= 8


def test_simultaneous_dials_keep_the_session_started_by_the_smaller_key() -> None:
    small, large = b"\x01" * 32, b"\x02" * 32
    # each side sees the two connections in either order and keeps the same one
    assert keeps_new(old_initiator=large, new_initiator=small, old_age=0.1)
    assert not keeps_new(old_initiator=small, new_initiator=large, old_age=0.1)


def test_a_newer_session_replaces_one_the_peer_lost() -> None:
    small, large = b"\x01" * 32, b"\x02" * 32
    # the peer dials only when it has no session: the old one is dead on its side
    assert keeps_new(old_initiator=small, new_initiator=large, old_age=DUPLICATE_WINDOW_S + 1)
    # the same side dialled again: it lost the first connection
    assert keeps_new(old_initiator=large, new_initiator=large, old_age=0.1)


def test_two_nodes_dialling_each_other_at_once_keep_one_session_the_same_one(
    tmp_path: Path,
) -> None:
    """Both nodes start in one event loop, so both dial in the same instant: each must
    end with one session with the other, and both with the same connection."""
    a, b, ports = joined_pair(tmp_path)
    with b.serving(ports[1]):  # a remembers b's address too: both will dial
        a.run("sync", f"127.0.0.1:{ports[1]}", "--dir", str(a.root))
    keys = [load_or_create_key(d.home) for d in (a, b)]
    smaller = min(bytes(k.verify_key) for k in keys)

    async def scenario() -> list[list[Link]]:
        nodes = nodes_in_loop((a, b), ports)
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as tasks:
            for node in nodes:
                tasks.create_task(node.run(stop))
            deadline = time.monotonic() + 20
            runtimes = []
            while len(runtimes) < 2 or not all(r.links for r in runtimes):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
                runtimes = [r for node in nodes for r in node.runtimes.values()]
            await asyncio.sleep(1)  # any duplicate is settled by now
            kept = [list(r.links.values()) for r in runtimes]
            dialled = sum(t.attempts for r in runtimes for t in r.targets.values())
            stop.set()
        assert dialled >= 2  # both did dial
        return kept

    for _ in range(3):
        kept = asyncio.run(scenario())
        assert [len(links) for links in kept] == [1, 1]
        assert kept[0][0].initiator == kept[1][0].initiator == smaller


def test_release_memory_hands_back_the_page_cache_a_whole_scan_filled(share: Share) -> None:
    """An idle node on 100,000 files kept SQLite's 64 MiB page cache full from its
    start-up check and scan, and the heap the scan's objects had freed: 152 MiB against
    Syncthing's 132 MiB."""
    process = psutil.Process()
    share.db.conn.execute("PRAGMA cache_size=-65536")  # (a catalog asks for 8 MiB)
    with share.db.conn:  # (written pages stay cached: a read of length() reads none)
        share.db.conn.execute("CREATE TABLE filler (b BLOB)")
        share.db.conn.executemany(
            "INSERT INTO filler VALUES (?)", ((os.urandom(64 * 1024),) for _ in range(640))
        )
    share.db.conn.execute("SELECT sum(length(b)) FROM filler").fetchone()  # 40 MiB cached
    before = process.memory_info().rss
    share.release_memory()
    assert process.memory_info().rss < before - 20 * 1024 * 1024
