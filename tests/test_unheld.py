"""Where a replaced version's bytes still are: each device announces (signed UNHELD
events) the replaced contents it no longer holds, so ``history`` on any device can say
"perhaps on B" or "no device holds them" instead of only "pruned here"."""

from __future__ import annotations

from pathlib import Path

import pytest

from backer.model import entropy
from backer.model.membership import EventKind
from backer.model.share import Share
from backer.node.commands import history_report
from backer.protocol.session import Session
from backer.protocol.wire import ProtocolError
from backer.versioner.prune import prune_share
from backer.versioner.retention import DAY
from tests.helpers import forge, make_devices, pump, sync
from tests.test_versioner_prune import START_MS, Clock, _save


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    source = Clock(START_MS)
    monkeypatch.setattr(entropy, "_source", source)
    return source


def _rows(share: Share, path: str) -> list[dict[str, object]]:
    return history_report(share, share.catalog.history(path))


def test_history_says_where_replaced_bytes_are_until_every_device_pruned_them(
    tmp_path: Path, clock: Clock
) -> None:
    a, b = make_devices(tmp_path, 2)
    _save(a, "notes.txt", b"first")
    sync(a, b)  # b applies "first": both hold it once it is replaced
    _save(a, "notes.txt", b"second")
    sync(a, b)
    first = _rows(b, "notes.txt")[0]
    assert (first["bytes"], first["held_by"]) == ("here", [])

    clock.now += 400 * DAY * 1_000_000  # far past every retention tier
    _save(a, "later.txt", b"later")  # an event that shows the time passed (see R31)
    report = prune_share(a, entropy.now_ms())
    assert report.versions == 1 and report.announced == 1
    sync(a, b)
    first = _rows(b, "notes.txt")[0]
    assert (first["bytes"], first["held_by"]) == ("here", [])  # b still has them
    first = _rows(a, "notes.txt")[0]
    assert first["pruned"] is not None
    assert (first["bytes"], first["held_by"]) == ("elsewhere", [b.members.names[b.device]])

    assert prune_share(b, entropy.now_ms()).announced == 1
    assert prune_share(b, entropy.now_ms()).announced == 0  # said once, not every hour
    sync(a, b)
    for share in (a, b):
        first, second = _rows(share, "notes.txt")
        assert (first["bytes"], first["held_by"]) == ("nowhere", [])
        assert (second["bytes"], second["live"]) == ("here", True)


def test_a_device_that_never_held_a_replaced_version_says_so_at_its_first_prune(
    tmp_path: Path, clock: Clock
) -> None:
    a, b = make_devices(tmp_path, 2)
    _save(a, "plan.txt", b"draft one")
    _save(a, "plan.txt", b"draft two")  # b never sees draft one on disk
    sync(a, b)
    first = _rows(b, "plan.txt")[0]
    assert (first["pruned"], first["bytes"]) == (None, "elsewhere")
    assert prune_share(b, entropy.now_ms()).announced == 1
    sync(a, b)
    assert _rows(a, "plan.txt")[0]["bytes"] == "here"  # inside a's window: kept


@pytest.mark.parametrize("payload", [b"", b"\1" * 33, b"\1" * 32 * 2001])
def test_an_unheld_event_that_is_not_whole_content_ids_or_too_long_is_refused(
    tmp_path: Path, payload: bytes
) -> None:
    honest, member = make_devices(tmp_path, 2)
    sync(honest, member)
    stored = honest.journal.count()
    forge(member, payload, kind=EventKind.UNHELD)
    with pytest.raises(ProtocolError, match="unheld event"):
        pump(Session(member, "m"), Session(honest, "h"))
    assert honest.journal.count() == stored
