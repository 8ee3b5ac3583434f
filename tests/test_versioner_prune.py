"""Prune on a real share with a simulated clock: a year of edits leaves exactly the
versions the policy names, and the size cap holds on a small disk."""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

import pytest

from backer.model import entropy
from backer.model.records import Version
from backer.model.share import Share
from backer.scanner.content import manifest_of_bytes
from backer.versioner import config
from backer.versioner.prune import aging_time, prune
from backer.versioner.retention import DAY, HOUR, MINUTE, Candidate, Policy, by_age
from backer.versioner.store import Store
from tests.helpers import make_devices, small_disk

START_MS = 1_780_000_000_000


class Clock(entropy.Source):
    """The real randomness, a clock the test moves; the boot clock moves with it but
    for the ``jumped`` nanoseconds (a wall clock set ahead)."""

    def __init__(self, now_ms: int) -> None:
        self.now = now_ms * 1_000_000
        self.jumped = 0

    def now_ns(self) -> int:
        return self.now

    def since_boot(self) -> tuple[str, int] | None:
        return ("test boot", self.now - self.jumped)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    source = Clock(START_MS)
    monkeypatch.setattr(entropy, "_source", source)
    return source


def _save(share: Share, name: str, data: bytes) -> None:
    """An editor's save (a new file renamed over the old), then a scan."""
    new = share.root / f"{name}.saving"
    new.write_bytes(data)
    new.replace(share.root / name)
    share.scan()


def _held(share: Share) -> set[bytes]:
    return set(Store(share.root, share.catalog).contents())


def test_a_year_of_edits_pruned_daily_leaves_exactly_what_the_policy_says(
    tmp_path: Path, clock: Clock
) -> None:
    (share,) = make_devices(tmp_path, 1)
    rng = random.Random(12)
    saved: list[tuple[str, bytes, int]] = []  # (path, content id, when saved)
    next_prune = START_MS
    for n in range(400):
        clock.now += rng.choice([MINUTE, 20 * MINUTE, 3 * HOUR, DAY, 4 * DAY]) * 1_000_000
        now_ms = clock.now // 1_000_000
        name = rng.choice(["a.txt", "b.txt"])
        data = f"{name} edit {n}".encode()
        _save(share, name, data)
        saved.append((name, manifest_of_bytes(data).id, now_ms))
        if now_ms >= next_prune:
            with share.db.conn:
                prune(share.root, share.catalog, now_ms)
            next_prune = now_ms + DAY
    end = clock.now // 1_000_000
    with share.db.conn:
        prune(share.root, share.catalog, end)
    replaced = []  # each save replaced the path's previous one, at its own time
    for path in ("a.txt", "b.txt"):
        mine = [(content, when) for p, content, when in saved if p == path]
        for (content, _), (_, then) in itertools.pairwise(mine):
            replaced.append(Candidate(content.hex(), path, then, content, 1))
    live = {[c for p, c, _ in saved if p == path][-1] for path in ("a.txt", "b.txt")}
    expected = {c.content for c in replaced if c.version_id in by_age(replaced, end, Policy())}
    assert _held(share) == expected | live
    assert end - START_MS > 365 * DAY and 30 < len(expected) < len(replaced) // 2


def test_the_size_cap_holds_on_a_small_disk(tmp_path: Path, clock: Clock) -> None:
    with small_disk(tmp_path / "disk", "40m") as disk:
        (share,) = make_devices(disk, 1)
        for _ in range(12):
            clock.now += DAY * 1_000_000
            _save(share, "big.bin", os.urandom(1_000_000))
        with share.db.conn:
            config.set_value(share.catalog, "max-disk", "10%")
            report = prune(share.root, share.catalog, clock.now // 1_000_000)
        store = share.root / ".backer" / "store"
        alone = [p for p in store.glob("*/*") if p.stat().st_nlink == 1]
        used = sum(p.stat().st_blocks * 512 for p in alone)
        assert 0 < report.kept_bytes <= report.cap and used <= report.cap + 64 * 1024
        assert report.versions >= 6 and len(alone) == report.kept_files - 1  # + the live one
        by_time = sorted((v.time_ms, v.content) for _, v in _versions(share).values())
        flags = [content in _held(share) for _, content in by_time]
        assert flags == sorted(flags) and flags[-1]  # the oldest went first
        share.close()


def test_R33_a_clock_that_jumped_ahead_is_not_believed_after_edits_made_at_it(
    tmp_path: Path, clock: Clock
) -> None:
    """R31's guard held only until the first edit: a version recorded after the jump
    carries the jumped time, and the next prune believed it and dropped every replaced
    version. Within one boot the wall clock is held to the boot clock's pace; once the
    real time has passed (the boot clock moved too) versions age as usual."""
    (share,) = make_devices(tmp_path, 1)
    for n in range(3):
        clock.now += HOUR * 1_000_000
        _save(share, "ver.txt", f"version {n}".encode())
    with share.db.conn:
        prune(share.root, share.catalog, clock.now // 1_000_000)  # (the node's, at start)
    held = _held(share)
    assert len(held) == 3
    clock.now += 400 * DAY * 1_000_000
    clock.jumped += 400 * DAY * 1_000_000  # an RTC reset, an NTP step: the boot clock stays
    for hour in range(3):  # edits at the jumped time, and the node's hourly prunes
        clock.now += HOUR * 1_000_000
        _save(share, f"later{hour}.txt", b"later")
        with share.db.conn:
            report = prune(share.root, share.catalog, clock.now // 1_000_000)
        assert (report.versions, _held(share) & held) == (0, held)
    clock.now += 2 * DAY * 1_000_000  # two days really pass (the boot clock moves too)
    with share.db.conn:
        report = prune(share.root, share.catalog, clock.now // 1_000_000)
    assert report.versions == 1  # past the hourly tier: one a day stays (and the live one)
    clock.jumped = 0  # the clock is set right: the boot clock and the wall agree again
    clock.now -= 400 * DAY * 1_000_000
    with share.db.conn:
        assert aging_time(share.catalog, clock.now // 1_000_000, 0) == clock.now // 1_000_000


def _versions(share: Share) -> dict[str, tuple[str, Version]]:
    rows = share.catalog.conn.execute("SELECT vid, path, record FROM versions")
    return {vid: (path, Version.decode(record)) for vid, path, record in rows}


def test_R31_a_clock_that_jumps_ahead_drops_no_kept_version(tmp_path: Path, clock: Clock) -> None:
    """A clock 400 days ahead (an RTC reset) made the next prune drop every replaced
    version; a clock more than a day past the newest event recorded is not believed for
    ages, and an event made at the new time (the time really passed) is."""
    (share,) = make_devices(tmp_path, 1)
    for n in range(3):
        clock.now += HOUR * 1_000_000
        _save(share, "ver.txt", f"version {n}".encode())
    held = _held(share)
    assert len(held) == 3
    jumped = clock.now // 1_000_000 + 400 * DAY
    with share.db.conn:
        report = prune(share.root, share.catalog, jumped)
    assert (report.versions, _held(share)) == (0, held)
    clock.now = jumped * 1_000_000  # the time has passed: an edit made now shows it
    _save(share, "ver.txt", b"version 3")
    with share.db.conn:
        report = prune(share.root, share.catalog, jumped + HOUR)
    assert report.versions == 2  # the two oldest: the third was replaced within the hour
