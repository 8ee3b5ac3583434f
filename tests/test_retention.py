"""The retention policy (pure): what a staggered schedule and a size cap keep."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from backer.versioner.retention import (
    DAY,
    HOUR,
    MINUTE,
    WEEK,
    Candidate,
    Policy,
    by_age,
    capped,
    retained,
)

NOW = 1_800_000_000_000
YEAR = 365 * DAY


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    steps = sorted(draw(st.lists(st.integers(0, 400 * DAY), min_size=4, max_size=4)))
    return Policy(*steps, max_disk=draw(st.floats(0, 1)))


def _age(candidate: Candidate) -> int:
    """How long ago ``candidate`` was replaced; one replaced after ``NOW`` (its author's
    clock ahead) is as young as one replaced now, not younger (R37)."""
    return max(0, NOW - candidate.since_ms)


@st.composite
def histories(draw: st.DrawFn) -> list[Candidate]:
    count = draw(st.integers(0, 60))
    found = []
    for n in range(count):
        content = draw(st.sampled_from([b"x", b"y", b"z", bytes([n % 256])]))
        found.append(
            Candidate(
                version_id=f"v{n}",
                path=draw(st.sampled_from(["a", "b", "c/d"])),
                since_ms=NOW - draw(st.integers(-HOUR, 400 * DAY)),
                content=content,
                size=content[0] * 37 % 10_000,  # one content, one size
            )
        )
    return found


def _buckets(history: list[Candidate], policy: Policy) -> dict[tuple, list[Candidate]]:
    """Every bucket of every tier that reaches into its tier's window, with its members
    (finest tier first)."""
    found: dict[tuple, list[Candidate]] = {}
    for candidate in history:
        for until, span in policy.tiers:
            bucket = candidate.since_ms // span
            if until > 0 and (bucket + 1) * span > NOW - until:
                found.setdefault((candidate.path, span, bucket), []).append(candidate)
    return found


@settings(max_examples=100, deadline=None)
@given(histories(), policies(), st.integers(0, 100_000))
def test_nothing_inside_the_retention_window_is_ever_pruned(
    history: list[Candidate], policy: Policy, cap: int
) -> None:
    kept = retained(history, NOW, policy, cap)
    young = {c.version_id for c in history if _age(c) < policy.keep_all_ms}
    assert young <= kept


@settings(max_examples=100, deadline=None)
@given(histories(), policies())
def test_each_bucket_keeps_exactly_one_its_newest(history: list[Candidate], policy: Policy) -> None:
    """Each bucket in a tier's window keeps its newest version; a version is kept only
    if it is young or the newest of such a bucket; nothing older than every window."""
    kept = by_age(history, NOW, policy)
    young = {c.version_id for c in history if _age(c) < policy.keep_all_ms}
    newest = {
        max(members, key=lambda c: (c.since_ms, c.version_id)).version_id
        for members in _buckets(history, policy).values()
    }
    assert kept == young | newest
    for (path, span, bucket), members in _buckets(history, policy).items():
        coarser = [c for c in members if c.version_id in kept]  # (finer tiers keep more)
        assert max(members, key=lambda c: (c.since_ms, c.version_id)) in coarser
        assert all(c.path == path and c.since_ms // span == bucket for c in members)


@settings(max_examples=100, deadline=None)
@given(histories(), policies(), st.integers(0, 50_000))
def test_the_size_cap_holds_unless_only_the_last_hour_is_left(
    history: list[Candidate], policy: Policy, cap: int
) -> None:
    kept = retained(history, NOW, policy, cap)
    sizes = {c.content: c.size for c in history}
    cost = sum(sizes[content] for content in {c.content for c in history if c.version_id in kept})
    oldest_kept = [c for c in history if c.version_id in kept]
    if cost > cap:  # over the cap only when nothing older than keep_all is left
        assert all(_age(c) < policy.keep_all_ms for c in oldest_kept)
    assert kept <= by_age(history, NOW, policy)


def test_contents_a_file_still_holds_cost_nothing_against_the_cap() -> None:
    history = [Candidate("old", "a", NOW - 2 * DAY, b"live", 1000)]
    policy = Policy()
    assert capped(history, {"old"}, 0, NOW, policy, free={b"live"}) == {"old"}
    assert capped(history, {"old"}, 0, NOW, policy) == set()


def _edits(seed: int) -> list[Candidate]:
    """A seeded year of edits of three files: bursts minutes apart, quiet days."""
    rng = random.Random(seed)
    found, when, n = [], NOW - YEAR - 30 * DAY, 0
    while when < NOW:
        when += rng.choice([MINUTE, 7 * MINUTE, HOUR, 5 * HOUR, DAY, 3 * DAY])
        path = rng.choice(["report.txt", "notes/todo.md", "photo.jpg"])
        found.append(Candidate(f"v{n:05d}", path, when, bytes([n % 251]), 100))
        n += 1
    return found


def test_a_year_pruned_every_hour_leaves_exactly_what_the_policy_keeps_at_the_end() -> None:
    """Pruned hour after hour on a simulated clock, a year of edits leaves exactly the
    versions the schedule names for the last moment: no version dropped early was
    wanted later (hours nest in days, days in weeks)."""
    for seed in range(3):
        history = _edits(seed)
        policy, held, clock = Policy(), [], NOW - YEAR - 30 * DAY
        pending = iter(history)
        upcoming = next(pending, None)
        while clock <= NOW:
            while upcoming is not None and upcoming.since_ms <= clock:
                held.append(upcoming)
                upcoming = next(pending, None)
            kept = by_age(held, clock, policy)
            held = [c for c in held if c.version_id in kept]
            clock += HOUR
        end = clock - HOUR  # the last moment pruned at
        recorded = [c for c in history if c.since_ms <= end]
        assert {c.version_id for c in held} == by_age(recorded, end, policy)
        per_path: dict[str, list[Candidate]] = {}
        for c in held:
            per_path.setdefault(c.path, []).append(c)
        for versions in per_path.values():  # the last hour's, then 23 + 30 + 53 at most
            young = sum(1 for c in versions if end - c.since_ms < HOUR)
            assert len(versions) <= young + 23 + 30 + 53
        assert all(end - c.since_ms < 365 * DAY for c in held)
        assert any(end - c.since_ms > 300 * DAY for c in held)  # weeklies reach back


def test_the_default_schedule_by_example() -> None:
    """Edits every 10 minutes for two years: 6 in the last hour, 23 hourly, the dailies
    and weeklies."""
    history = [
        Candidate(f"v{n:06d}", "f", NOW - n * 10 * MINUTE, b"c", 1)
        for n in range(0, 2 * 365 * 24 * 6)
    ]
    chosen = by_age(history, NOW, Policy())
    kept = [c for c in history if c.version_id in chosen]
    ages = [NOW - c.since_ms for c in kept]
    assert sum(a < HOUR for a in ages) == 6
    assert 23 <= sum(HOUR <= a < DAY for a in ages) <= 24
    assert 29 <= sum(DAY <= a < 30 * DAY for a in ages) <= 30
    assert 47 <= sum(30 * DAY <= a < 365 * DAY for a in ages) <= 49
    assert max(ages) < YEAR and max(ages) > WEEK
