"""Which replaced and deleted versions keep their bytes: the retention policy (pure).

Staggered, per path, by when a version stopped being current (its ``since``: when a
later version or a deletion replaced it): every version for ``keep_all``, then one per
hour until a day, one per day until 30 days, one per week until a year, none after.
Buckets are fixed spans of the clock (hour 0 starts at the epoch); each bucket of a
tier that reaches into the tier's window keeps its newest version — the one that was
current at the end of that span, which is what "the file as it was on Tuesday" means
(a finer tier may keep more of the same span). Hours nest in days and days in weeks,
and which version is a bucket's newest never changes, so a version dropped once is
never wanted later: pruning every hour leaves exactly what one pruning at the end
would.

On top, a size cap: while the contents the kept versions need take more than ``cap``
bytes, the oldest kept version goes — but never one inside ``keep_all``: the last
hour's work beats the cap. Contents a file of the share still holds cost nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass

SECOND = 1000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR
WEEK = 7 * DAY


@dataclass(frozen=True)
class Policy:
    keep_all_ms: int = HOUR
    hourly_until_ms: int = DAY
    daily_until_ms: int = 30 * DAY
    weekly_until_ms: int = 365 * DAY
    max_disk: float = 0.2  # of the room the store may use: its own bytes plus free space

    @property
    def tiers(self) -> tuple[tuple[int, int], ...]:
        """(kept while younger than, one per bucket of), finest first."""
        return (
            (self.hourly_until_ms, HOUR),
            (self.daily_until_ms, DAY),
            (self.weekly_until_ms, WEEK),
        )


@dataclass(frozen=True)
class Candidate:
    """A replaced or deleted file version whose bytes this device holds."""

    version_id: str
    path: str
    since_ms: int  # when it stopped being current
    content: bytes
    size: int


def recent(candidate: Candidate, now_ms: int, policy: Policy) -> bool:
    """Whether ``candidate`` is inside the ``keep_all`` window. One replaced after
    ``now_ms`` (an author's clock ahead of ours) is as young as one replaced now, not
    younger: with ``keep_all`` 0 (``prune --all``) it goes too, or a peer's clock set
    years ahead would keep what it replaced past every prune, a full disk included."""
    return max(0, now_ms - candidate.since_ms) < policy.keep_all_ms


def by_age(candidates: Iterable[Candidate], now_ms: int, policy: Policy) -> set[str]:
    """The version ids the staggered schedule keeps: every one younger than
    ``keep_all``, and the newest of each bucket of each tier that reaches into the
    tier's window."""
    kept: set[str] = set()
    newest: dict[tuple[str, int, int], Candidate] = {}
    for candidate in candidates:
        if recent(candidate, now_ms, policy):
            kept.add(candidate.version_id)
        for until, span in policy.tiers:
            bucket = candidate.since_ms // span
            if until > 0 and (bucket + 1) * span > now_ms - until:
                key = (candidate.path, span, bucket)
                held = newest.get(key)
                if held is None or _order(candidate) > _order(held):
                    newest[key] = candidate
    kept.update(c.version_id for c in newest.values())
    return kept


def capped(
    candidates: Iterable[Candidate],
    kept: set[str],
    cap: int,
    now_ms: int,
    policy: Policy,
    free: Collection[bytes] = (),
) -> set[str]:
    """``kept`` less its oldest versions until what they need fits in ``cap`` bytes
    (contents in ``free`` cost nothing); versions inside ``keep_all`` always stay."""
    chosen = sorted((c for c in candidates if c.version_id in kept), key=_order)
    needs = Counter(c.content for c in chosen)
    sizes = {c.content: c.size for c in chosen}
    cost = sum(sizes[content] for content in needs if content not in free)
    kept = set(kept)
    for candidate in chosen:
        if cost <= cap or recent(candidate, now_ms, policy):
            break  # oldest first: every one after is younger still
        kept.discard(candidate.version_id)
        needs[candidate.content] -= 1
        if needs[candidate.content] == 0 and candidate.content not in free:
            cost -= candidate.size
    return kept


def retained(
    candidates: list[Candidate],
    now_ms: int,
    policy: Policy,
    cap: int | None = None,
    free: Collection[bytes] = (),
) -> set[str]:
    """The version ids whose bytes stay: the schedule, then the size cap (if any)."""
    kept = by_age(candidates, now_ms, policy)
    return kept if cap is None else capped(candidates, kept, cap, now_ms, policy, free)


def _order(candidate: Candidate) -> tuple[int, str]:
    return candidate.since_ms, candidate.version_id
