"""A first sync plans one operation per file: what each holds bounds the memory of a
share of many small files (measured here with tracemalloc, on a real catalog)."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import psutil
import sqlite_utils

from backer.db.catalog import PAGE_CACHE_KIB, Catalog, LocalEntry
from backer.model.materializer import plan
from backer.model.records import Kind, Version, make_key, new_version_id
from backer.model.state import Delta, FileState
from backer.versioner.prune import survey
from backer.versioner.store import Store
from journal.store import Journal

FILES = 5_000
WINDOW = 500


def test_a_first_sync_plan_holds_its_operations_outside_python_objects(tmp_path: Path) -> None:
    """A first sync plans one operation per file: held as objects for the whole sync
    they were ~423 bytes per file (43 MB of a 100,000-file join's peak; ~640 before
    slotted objects). The plan keeps them in a temporary database, and a window taken
    from it holds only its own files, in path order."""
    catalog = Catalog(sqlite_utils.Database(str(tmp_path / "catalog.db")))
    device, scanned_ms = os.urandom(8), 1_700_000_000_000
    delta = Delta()
    for i in range(FILES):
        version = Version(
            Kind.FILE, 2048, scanned_ms * 10**6 + i, 0o644, os.urandom(32), device, scanned_ms
        )
        delta.added[make_key(f"d{i % 1000:03d}/f{i:06d}.txt", new_version_id())] = version.encode()
    with catalog.conn:
        catalog.apply_delta(delta, os.urandom(32), 1)
    (tmp_path / ".backer").mkdir()  # (where a plan is held)
    tracemalloc.start()
    try:
        planned = plan(catalog, tmp_path)
        held = tracemalloc.get_traced_memory()[0]
        window = planned.take(WINDOW, 2**40)
        held_with_window = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    with planned:
        assert (planned.files, planned.writes, planned.bytes) == (FILES, FILES, FILES * 2048)
        assert held / FILES < 20, f"{held / FILES:.0f} bytes per planned file"
        assert (held_with_window - held) / WINDOW < 600, "a window's operations grew"
        paths = [op.path for op in window] + [op.path for op in planned.take(FILES, 2**40)]
        assert paths == sorted(paths) and len(set(paths)) == FILES
        assert not planned and not planned.take(FILES, 2**40)


def test_a_received_updates_delta_holds_under_260_bytes_per_entry() -> None:
    """A first sync's run of events keeps every event's delta until the journal stores
    the run (100,000 entries for a 100,000-file share): each entry holds its encoded
    record, not a decoded version as well (346 bytes per entry with one)."""
    writer, device = FileState(device=os.urandom(32)), os.urandom(8)
    scanned_ms = 1_700_000_000_000
    update, _ = writer.write(
        (
            f"d{i % 1000:03d}/f{i:06d}.txt",
            new_version_id(),
            Version(
                Kind.FILE, 2048, scanned_ms * 10**6 + i, 0o644, os.urandom(32), device, scanned_ms
            ),
        )
        for i in range(FILES)
    )
    receiver = FileState(device=os.urandom(32))
    tracemalloc.start()
    try:
        delta = receiver.apply(update, receiver.check(update, lambda client: None))
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(delta.added) == FILES
    assert held / FILES < 260, f"{held / FILES:.0f} bytes per received entry"


def test_sqlite_page_cache_of_a_share_connection_stays_bounded(tmp_path: Path) -> None:
    """The journal asked SQLite for a 64 MiB page cache on the share's connection: a
    first sync of 100,000 files reads and writes a ~100 MB database on each side and
    filled it (up to 64 MiB of each side's peak RSS). Reading 40 MiB through the
    share's connection now keeps at most PAGE_CACHE_KIB of it."""
    path = str(tmp_path / "share.db")
    filler = sqlite_utils.Database(path)
    with filler.conn:
        filler.conn.execute("CREATE TABLE filler (b BLOB)")
        filler.conn.executemany(
            "INSERT INTO filler VALUES (?)", ((os.urandom(64 * 1024),) for _ in range(640))
        )
    filler.conn.close()
    db = sqlite_utils.Database(path)
    Journal(db)  # (as a share opens: the journal first, then the catalog)
    Catalog(db)
    process = psutil.Process()
    before = process.memory_info().rss
    for _ in db.conn.execute("SELECT b FROM filler"):  # every page through the cache
        pass
    grown = process.memory_info().rss - before
    assert grown < PAGE_CACHE_KIB * 1024 + 4 * 1024 * 1024, f"{grown / 2**20:.0f} MiB"


def test_a_plan_gives_its_writes_in_path_order_then_every_deletion_deepest_first(
    tmp_path: Path,
) -> None:
    """Windows of a plan held outside Python objects: the writes a few at a time (the
    bytes bound reached by the file that reaches it), then the deletions in one window,
    children before their folders."""
    catalog = Catalog(sqlite_utils.Database(str(tmp_path / "catalog.db")))
    device, scanned_ms = os.urandom(8), 1_700_000_000_000
    delta = Delta()
    for name in ["b", "a/y", "a/x", "c"]:
        version = Version(Kind.FILE, 100, scanned_ms * 10**6, 0o644, os.urandom(32), device, 1)
        delta.added[make_key(name, new_version_id())] = version.encode()
    gone = ["old", "old/deep", "old/deep/file", "z"]  # on disk here, live nowhere
    with catalog.conn:
        catalog.apply_delta(delta, os.urandom(32), 1)
        catalog.set_local(LocalEntry(p, new_version_id(), 0, 0, 0, 0o644, True) for p in gone)
    (tmp_path / ".backer").mkdir()
    with plan(catalog, tmp_path) as planned:
        assert (planned.files, planned.writes, planned.bytes) == (8, 4, 400)
        assert "a/x" in planned and "old/deep" in planned and "d" not in planned
        assert [op.path for op in planned.take(3, 10**9)] == ["a/x", "a/y", "b"]
        assert [op.path for op in planned.take(3, 150)] == ["c"]
        deletions = planned.take(1, 10**9)
        assert [op.path for op in deletions] == ["z", "old/deep/file", "old/deep", "old"]
        assert {op.version.kind for op in deletions} == {Kind.DELETED}
        assert len(planned) == 0 and planned.take(3, 10**9) == []
        assert "b" in planned  # (taken, still planned: its problems stay current)


def test_a_retention_survey_holds_under_400_bytes_per_file(tmp_path: Path) -> None:
    """The node surveys every recorded version at start-up and every hour. Holding each
    decoded version, the live set and the whole scan cache at once cost ~1.1 KB per
    file at the survey's peak (a 100,000-file node: 148 -> 257 MiB); read as one stream,
    only the store's contents and the contents files hold are kept."""
    catalog = Catalog(sqlite_utils.Database(str(tmp_path / "catalog.db")))
    device, scanned_ms = os.urandom(8), 1_700_000_000_000
    delta, entries, contents = Delta(), [], []
    for i in range(FILES):
        path, vid, content = f"d{i % 1000:03d}/f{i:06d}.txt", new_version_id(), os.urandom(32)
        version = Version(Kind.FILE, 2048, scanned_ms * 10**6 + i, 0o644, content, device, 1)
        delta.added[make_key(path, vid)] = version.encode()
        entries.append(LocalEntry(path, vid, 2048, scanned_ms * 10**6 + i, i, 0o100644, True))
        contents.append((content, 2048, scanned_ms))
    Store(tmp_path, catalog)  # (its tables)
    with catalog.conn:
        catalog.apply_delta(delta, os.urandom(32), 1)
        catalog.set_local(entries)
        catalog.conn.executemany("INSERT INTO store VALUES (?, ?, ?)", contents)
    del delta, entries, contents
    tracemalloc.start()
    try:
        surveyed = survey(catalog)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(surveyed.held) == len(surveyed.free) == FILES and not surveyed.found
    assert surveyed.newest_ms == 1
    assert peak / FILES < 400, f"{peak / FILES:.0f} bytes per file at the survey's peak"


SNAPSHOT_PROBE = """
import os, sys, sqlite_utils
from backer.db.catalog import Catalog

def peak_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))

catalog = Catalog(sqlite_utils.Database(sys.argv[1]))
value = os.urandom(48 * 1024 * 1024)
before = peak_kib()
with catalog.conn:
    catalog.set_meta_large("doc_snapshot", value)
grown = peak_kib() - before
assert catalog.get_meta("doc_snapshot") == value
print(grown)
"""


def test_the_documents_snapshot_is_stored_without_a_copy_of_it(tmp_path: Path) -> None:
    """The snapshot of a 100,000-file share's document is ~11 MB, saved as a share
    closes: bound as a parameter, SQLite copied it whole, and a first sync's peak was
    at its end. Written in pieces into its row, the process grows by no copy of it
    (a fresh process: its peak is this write's alone)."""
    probe = subprocess.run(
        [sys.executable, "-c", SNAPSHOT_PROBE, str(tmp_path / "catalog.db")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    grown_kib = int(probe.stdout)
    assert grown_kib < 16 * 1024  # a copy of the 48 MiB value is 48 MiB
