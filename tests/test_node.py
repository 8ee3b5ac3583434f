"""The node's pure rules: how long to wait before dialling again, and which of two
sessions with one device to keep."""

from __future__ import annotations

import random

from backer.node.node import BACKOFF_CAP_S, DUPLICATE_WINDOW_S, backoff, keeps_new


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
