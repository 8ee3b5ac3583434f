"""An off-loop scan records each large file alone as soon as it is hashed: a node pushes
it to its peers, who start writing it while the next one is hashed."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from backer.model.membership import EventKind
from backer.model.share import Share
from backer.scanner import walk
from backer.scanner.content import manifest_of_bytes
from tests.helpers import live

LARGE = 2 * 1024 * 1024


def _state_events(share: Share) -> int:
    return sum(1 for _, e in share.journal.since(0) if e.kind == EventKind.STATE)


def _recorded(share: Share, contents: dict[str, bytes]) -> list[str]:
    """The paths whose live version holds ``contents[path]``."""
    versions = live(share)
    return sorted(
        path
        for path, data in contents.items()
        if path in versions and versions[path].content == manifest_of_bytes(data).id
    )


@pytest.fixture
def apart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(walk, "APART_FROM", LARGE)


def test_each_large_file_is_recorded_and_pushed_before_the_next_one_is_hashed(
    share: Share, apart: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second large file's hashing waits until the first was recorded and pushed:
    without recording apart it would wait in vain (the whole scan records at its end)."""
    root = share.root
    old = {f"big{n}": os.urandom(LARGE) for n in range(3)}
    old |= {"small": b"small"}
    for path, data in old.items():
        (root / path).write_bytes(data)
    share.scan()
    new = {path: data[:100] + b"0123456789" + data[100:] for path, data in old.items()}
    for path, data in new.items():
        (root / path).write_bytes(data)
    pushed = threading.Event()
    read_stable = walk.read_stable
    waited: dict[str, bool] = {}

    def slow_second(seen: walk.Seen) -> tuple:
        if seen.path == "big1":
            waited[seen.path] = pushed.wait(10)
        return read_stable(seen)

    monkeypatch.setattr(walk, "read_stable", slow_second)
    seen_at_push: list[list[str]] = []

    def recorded() -> None:
        seen_at_push.append(_recorded(share, new))
        pushed.set()

    summary = asyncio.run(share.scan_off_loop(sorted(new), recorded=recorded))
    assert waited == {"big1": True}
    assert seen_at_push == [["big0"], ["big0", "big1"], ["big0", "big1", "big2"]]
    assert sorted(summary.modified) == sorted(new)  # the whole scan's summary
    assert _recorded(share, new) == sorted(new)
    assert share.scan().events == 0


def test_a_whole_off_loop_scan_records_large_files_apart_and_small_ones_together(
    share: Share, apart: None
) -> None:
    root = share.root
    (root / "d").mkdir()
    for n in range(2):
        (root / "d" / f"big{n}").write_bytes(os.urandom(LARGE))
    for n in range(5):
        (root / "d" / f"small{n}").write_bytes(b"s%d" % n)
    before = _state_events(share)
    pushes: list[int] = []
    summary = asyncio.run(share.scan_off_loop(recorded=lambda: pushes.append(1)))
    assert len(summary.added) == 1 + 2 + 5
    assert len(pushes) == 2
    assert _state_events(share) - before == 3  # each large file, then the rest
    assert share.scan().events == 0


def test_a_one_shot_scan_does_not_record_large_files_apart(share: Share, apart: None) -> None:
    for n in range(3):
        (share.root / f"big{n}").write_bytes(os.urandom(LARGE))
    before = _state_events(share)
    assert len(share.scan().added) == 3
    assert _state_events(share) - before == 1


def test_a_scan_cancelled_after_a_large_file_was_recorded_loses_nothing(
    share: Share, apart: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recorded is recorded (and pushed); what the cancelled scan had not recorded yet
    is found by the next scan, never recorded by the cancelled one afterwards (the
    files after the first are hashed only once the scan was cancelled)."""
    contents = {f"big{n}": os.urandom(LARGE) for n in range(4)}
    for path, data in contents.items():
        (share.root / path).write_bytes(data)
    cancelled = threading.Event()
    read_stable = walk.read_stable

    def held_back(seen: walk.Seen) -> tuple:
        if seen.path != "big0":
            cancelled.wait(10)
        return read_stable(seen)

    monkeypatch.setattr(walk, "read_stable", held_back)

    async def main() -> list[str]:
        first = asyncio.Event()
        scan = asyncio.create_task(share.scan_off_loop(recorded=first.set))
        await asyncio.wait_for(first.wait(), 30)
        scan.cancel()
        cancelled.set()
        with pytest.raises(asyncio.CancelledError):
            await scan
        await asyncio.sleep(0.2)  # a part handed over late is not recorded
        return _recorded(share, contents)

    recorded = asyncio.run(main())
    assert recorded == ["big0"]
    assert len(share.scan().added) == 4 - len(recorded)
    assert _recorded(share, contents) == sorted(contents)


def test_a_large_file_that_cannot_be_read_is_a_problem_not_a_deletion(
    share: Share, apart: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("big", "other"):
        (share.root / name).write_bytes(os.urandom(LARGE))
    share.scan()
    (share.root / "big").write_bytes(os.urandom(LARGE))
    (share.root / "other").write_bytes(os.urandom(LARGE))
    read_stable = walk.read_stable

    def unreadable(seen: walk.Seen) -> tuple:
        if seen.path == "big":
            return seen, None, b"", walk.Problem("big", "cannot read: Permission denied")
        return read_stable(seen)

    monkeypatch.setattr(walk, "read_stable", unreadable)
    summary = asyncio.run(share.scan_off_loop(recorded=lambda: None))
    assert (summary.modified, summary.deleted) == (["other"], [])
    assert [p.path for p in summary.errors] == ["big"]
    assert "big" in live(share)

