"""A scan's versions and their scan-cache entries commit in one transaction: a device
must never record a version without knowing that its disk holds it, or the person's
next edit of that file is recorded beside it (a conflict), not after it — and with the
edit made in place, that version's bytes are on no disk (simulation seed 80191)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from backer.db.catalog import Catalog
from backer.model import revisions
from backer.model.records import Kind, Version
from backer.model.share import Share
from tests.helpers import make_devices


def _refusing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The catalog's scan-cache writes fail as on a full disk (SQLITE_FULL)."""

    def full(self: Catalog, entries: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Catalog, "set_local", full)


def test_a_scan_whose_cache_write_is_refused_records_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (share,) = make_devices(tmp_path, 1)
    (share.root / "a").mkdir()
    edited = share.root / "a" / "f"
    edited.write_bytes(os.urandom(20_000))
    position = share.journal.position()
    _refusing(monkeypatch)
    with pytest.raises(sqlite3.OperationalError):
        share.scan()
    monkeypatch.undo()
    assert share.journal.position() == position  # no version without its cache entry
    assert share.catalog.live_versions("a/f") == {}

    edited.write_bytes(b"the person's next edit")  # in place: the 20,000 bytes are gone
    share.scan()
    (version,) = share.catalog.live_versions("a/f").values()  # one version, no conflict
    assert version.size == len(b"the person's next edit")
    assert share.catalog.conflicted_paths() == []


def test_a_restore_whose_cache_write_is_refused_records_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (share,) = make_devices(tmp_path, 1)
    kept = share.root / "f"
    kept.write_bytes(b"the version the disk holds")
    share.scan()
    ((vid, held),) = share.catalog.live_versions("f").items()
    position = share.journal.position()
    again = Version(
        Kind.FILE,
        device=held.device,
        time_ms=held.time_ms + 1,
        size=held.size,
        content=held.content,
        supersedes=(vid,),
    )
    _refusing(monkeypatch)
    with pytest.raises(sqlite3.OperationalError):
        revisions.apply(share, [("f", again)])
    monkeypatch.undo()
    assert share.journal.position() == position
    assert list(share.catalog.live_versions("f")) == [vid]


def test_a_share_closed_on_a_full_disk_lets_go_and_opens_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The document's snapshot is a start-up cache: a close that cannot write it (the
    disk full, SQLITE_FULL) still closes, not cleanly, and the next open has every
    change. It raised out of close, and a node's stop or the simulation's failed on it."""
    (share,) = make_devices(tmp_path, 1)
    for n in range(50):
        (share.root / f"f{n}").write_bytes(os.urandom(100))
    share.scan()
    share.create_invite(60)  # (an event since the scan's snapshot)
    (pages,) = share.db.conn.execute("PRAGMA page_count").fetchone()
    share.db.conn.execute(f"PRAGMA max_page_count = {pages}")
    grown = share.state.snapshot() + bytes(8 * 4096)  # (a document grown past the room)
    monkeypatch.setattr(share.state, "snapshot", lambda: grown)
    with pytest.raises(sqlite3.OperationalError, match="full"):
        share.save_snapshot()  # (what close tries first)
    share.close()
    reopened = Share.open(share.root, share.key)
    try:
        assert reopened.checked  # not marked closed cleanly: its database was checked
        assert len(reopened.catalog.live_versions("f49")) == 1
    finally:
        reopened.close()
