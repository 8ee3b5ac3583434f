"""The catalog's live set: which recorded versions a path holds now."""

from __future__ import annotations

import os
from pathlib import Path

import sqlite_utils

from backer.db.catalog import Catalog
from backer.model.materializer import conflict_path, copy_version_id
from backer.model.records import Kind, Version, make_key, new_version_id
from backer.model.state import Delta


def _added(path: str, version_id: str, version: Version) -> Delta:
    delta = Delta()
    delta.added[make_key(path, version_id)] = version.encode()
    return delta


def test_a_copy_recorded_here_is_not_live_once_its_copy_at_another_name_supersedes_it(
    tmp_path: Path,
) -> None:
    """Every device records a conflict copy under the same id; the CRDT keeps this
    device's add of it, concurrent with another device's move of the copy to a copy of
    its own (a second conflict, at a longer name). The move supersedes the copy at the
    copy's own path: applied after the add, it left the copy live here alone, for good
    (seed 140479 of the campaign: a copy's copy of ``a/résumé``, no convergence)."""
    catalog = Catalog(sqlite_utils.Database(str(tmp_path / "catalog.db")))
    device, time_ms = os.urandom(8), 1_700_000_000_000
    source_id = new_version_id()
    source = Version(Kind.FILE, 3, time_ms * 10**6, 0o644, os.urandom(32), device, time_ms)
    copy_at, copy_id = conflict_path("a/résumé", source), copy_version_id(source_id)
    second_at, second_id = conflict_path(copy_at, source), copy_version_id(copy_id)
    moved = Version(
        Kind.FILE, 3, source.mtime_ns, 0o644, source.content, device, time_ms, (copy_id,)
    )
    with catalog.conn:
        catalog.apply_delta(_added(copy_at, copy_id, source), os.urandom(32), 1)
        catalog.apply_delta(_added(second_at, second_id, moved), os.urandom(32), 2)
    assert [(path, vid) for path, vid, _ in catalog.all_live()] == [(second_at, second_id)]
