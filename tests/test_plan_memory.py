"""A first sync plans one operation per file: what each holds bounds the memory of a
share of many small files (measured here with tracemalloc, on a real catalog)."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import sqlite_utils

from backer.db.catalog import Catalog
from backer.model.materializer import plan
from backer.model.records import Kind, Version, make_key, new_version_id
from backer.model.state import Delta

FILES = 5_000


def test_a_first_sync_plan_holds_under_500_bytes_per_file(tmp_path: Path) -> None:
    """Versions of one device and one scan share their device id and times, and plan
    operations and versions carry no per-object dict (~640 bytes per file before)."""
    catalog = Catalog(sqlite_utils.Database(str(tmp_path / "catalog.db")))
    device, scanned_ms = os.urandom(8), 1_700_000_000_000
    delta = Delta()
    for i in range(FILES):
        version = Version(
            Kind.FILE, 2048, scanned_ms * 10**6 + i, 0o644, os.urandom(32), device, scanned_ms
        )
        delta.added[make_key(f"d{i % 1000:03d}/f{i:06d}.txt", new_version_id())] = version
    with catalog.conn:
        catalog.apply_delta(delta, os.urandom(32), 1)
    tracemalloc.start()
    try:
        operations = plan(catalog)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(operations) == FILES
    assert {op.version.kind for op in operations} == {Kind.FILE}
    assert held / FILES < 500, f"{held / FILES:.0f} bytes per planned file"
