"""A whole scan records what it read in batches while it walks: a first scan of a huge
share holds one batch in memory, and one stopped half-way leaves a share whose next
scan records the rest."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import nacl.signing
import pytest

from backer.model.membership import EventKind
from backer.model.records import Kind
from backer.model.share import Share
from backer.scanner import walk
from tests.helpers import live


def _tree(root: Path, directories: int, files: int) -> None:
    for d in range(directories):
        folder = root / f"d{d:03d}"
        folder.mkdir()
        for f in range(files):
            (folder / f"f{f:05d}.txt").write_bytes(f"{d}/{f}".encode())
    old = time.time() - 3600
    for path in root.rglob("*"):
        os.utime(path, (old, old))


def _state_events(share: Share) -> int:
    return sum(1 for _, e in share.journal.since(0) if e.kind == EventKind.STATE)


def _scanned_in_batches_from_ten(
    tmp_path: Path,
    key: nacl.signing.SigningKey,
    monkeypatch: pytest.MonkeyPatch,
    directories: int,
    files: int,
) -> Share:
    """A share of ``directories`` folders of ``files`` files after its first scan, in
    batches of 10 files at least: every path recorded once, and a rescan finds every one
    unchanged."""
    monkeypatch.setattr(walk, "BATCH_FILES", 10)
    root = tmp_path / "share"
    root.mkdir()
    _tree(root, directories, files)
    share = Share.create(root, key)
    paths = directories * (1 + files)
    assert len(share.scan().added) == paths
    assert len(live(share)) == len(share.catalog.local_entries()) == paths
    again = share.scan()
    assert (again.added, again.modified, again.unchanged) == ([], [], paths)
    return share


def test_a_whole_scan_records_each_batch_while_it_walks(
    tmp_path: Path, key: nacl.signing.SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    share = _scanned_in_batches_from_ten(tmp_path, key, monkeypatch, 3, 12)
    assert _state_events(share) >= 4  # 3 batches of 10 files, then the rest


def test_batches_grow_with_the_share_so_a_large_first_scan_commits_fewer_times(
    tmp_path: Path, key: nacl.signing.SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches of 10 at first, then an eighth of what was walked (each commit rewrote a
    page per row of the hash-keyed indexes: fixed batches made a first scan's writes grow
    with the square of its files); every file recorded once all the same."""
    share = _scanned_in_batches_from_ten(tmp_path, key, monkeypatch, 4, 100)
    assert [walk.batch_files(n) for n in (0, 80, 160, 400)] == [10, 10, 20, 50]
    assert _state_events(share) < 30  # 40 batches of 10 before


def test_a_directory_whose_new_entries_were_recorded_in_an_earlier_batch_is_recorded_again(
    tmp_path: Path, key: nacl.signing.SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its new mtime reaches peers, as when the whole scan is one batch."""
    monkeypatch.setattr(walk, "BATCH_FILES", 10)
    root = tmp_path / "share"
    root.mkdir()
    _tree(root, 2, 3)
    share = Share.create(root, key)
    share.scan()
    for f in range(10):  # exactly one batch: none of them is left for the last one
        (root / "d001" / f"new{f}.txt").write_bytes(b"new")
    old = time.time() - 60
    os.utime(root / "d001", (old, old))
    summary = share.scan()
    assert len(summary.added) == 10
    assert summary.modified == ["d001"]
    assert live(share)["d001"].mtime_ns == (root / "d001").stat().st_mtime_ns


def test_a_rescan_reading_the_cache_page_by_page_finds_modified_new_deleted_and_unchanged(
    tmp_path: Path, key: nacl.signing.SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan cache is read in pages of 3 rows beside the walk (both in path order)
    while batches of 4 files are recorded: new files between cached ones, names that sort
    around a directory's entries ('a.b' before 'a/x', 'a0' after), deletions at the
    start, middle and end of the cache; nothing recorded behind the walk is read back as
    gone (the next scan finds everything unchanged)."""
    monkeypatch.setattr(walk, "BATCH_FILES", 4)
    monkeypatch.setattr(walk, "CACHE_PAGE", 3)
    root = tmp_path / "share"
    root.mkdir()
    _tree(root, 3, 6)
    for name in ["a/x.txt", "a/y/z.txt", "a.b", "a-c", "a0", "0first.txt", "zlast.txt"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode())
    old = time.time() - 3600
    for path in root.rglob("*"):
        os.utime(path, (old, old))
    share = Share.create(root, key)
    first = share.scan()
    before = set(share.catalog.local_entries())
    assert len(first.added) == len(before) == 3 + 18 + 2 + 7
    modified = ["a.b", "d001/f00003.txt", "a/y/z.txt"]
    for name in modified:
        (root / name).write_bytes(b"changed " + name.encode())
    added = ["a/x0.txt", "a/y.txt", "d001/f00002a.txt", "d002/zz.txt", "a.a"]
    added += [f"d000/f00001{c}.txt" for c in "abcdef"]
    for name in added:
        (root / name).write_bytes(name.encode())
    deleted = ["0first.txt", "d001/f00004.txt", "a0", "zlast.txt"]
    for name in deleted:
        (root / name).unlink()
    for path in [root / name for name in modified + added] + [root / "a", root / "d001"]:
        os.utime(path, (old + 60, old + 60))
    for directory in ["", "d000", "a/y", "d002"]:
        os.utime(root / directory, (old + 60, old + 60))
    summary = share.scan()
    assert sorted(summary.added) == sorted(added)
    directories = ["a", "a/y", "d000", "d001", "d002"]  # entries added, changed or removed
    assert sorted(summary.modified) == sorted(modified + directories)
    assert sorted(summary.deleted) == sorted(deleted)
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*")} - {".backer"}
    on_disk = {p for p in on_disk if not p.startswith(".backer/")}
    kept = {path for path, version in live(share).items() if version.kind != Kind.DELETED}
    assert set(share.catalog.local_entries()) == on_disk == kept
    again = share.scan()
    assert (again.added, again.modified, again.deleted) == ([], [], [])
    assert again.unchanged == len(on_disk)


PEAK_OF_A_SCAN = """
import sys, tracemalloc
from pathlib import Path
import nacl.signing
from backer.model.share import Share
from backer.scanner import walk

walk.BATCH_FILES = walk.CACHE_PAGE = 500
share = Share.create(Path(sys.argv[1]), nacl.signing.SigningKey.generate())
if sys.argv[2] == "rescan":
    share.scan()
tracemalloc.start()
summary = share.scan()
print(len(summary.added) + summary.unchanged, tracemalloc.get_traced_memory()[1])
"""


def _peak_of_a_scan(root: Path, which: str) -> tuple[int, int]:
    """Files added or unchanged, and the peak of Python objects, in a first scan or a
    rescan of ``root`` in a process of its own (nothing else allocates there meanwhile)."""
    measured = subprocess.run(
        [sys.executable, "-c", PEAK_OF_A_SCAN, str(root), which],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    files, peak = map(int, measured.stdout.split())
    return files, peak


def test_a_first_scan_holds_one_batch_of_files_in_memory(tmp_path: Path) -> None:
    """Python objects at the peak of a first scan of 4,000 files, in batches of 500
    (~1.6 KB per file when every file's walk entry, manifest and version were held to
    the end; the CRDT and SQLite hold native memory, not counted here). Measured in a
    process of its own: nothing else allocates there meanwhile."""
    root = tmp_path / "share"
    root.mkdir()
    _tree(root, 20, 200)
    added, peak = _peak_of_a_scan(root, "first")
    assert added == 20 + 4000
    assert peak / 4000 < 700, f"{peak / 4000:.0f} bytes per file at the peak"


def test_a_rescan_holds_a_page_of_the_scan_cache_not_all_of_it(tmp_path: Path) -> None:
    """Python objects at the peak of a rescan of 4,000 unchanged files, reading the scan
    cache 500 rows at a time beside the walk (~450 B per file when the whole cache was
    read into a dict first: at a million files, the most a rescan or a node's start held)."""
    root = tmp_path / "share"
    root.mkdir()
    _tree(root, 20, 200)
    unchanged, peak = _peak_of_a_scan(root, "rescan")
    assert unchanged == 20 + 4000
    assert peak / 4000 < 200, f"{peak / 4000:.0f} bytes per file at the peak"


def test_an_init_killed_between_batches_is_completed_by_the_next_scan(tmp_path: Path) -> None:
    """``backer init`` of 12,000 files (batches of 5,000) killed once the first batch is
    recorded: the next command opens the share and its scan records the rest, every path
    once, with no conflict and nothing recorded twice."""
    root = tmp_path / "share"
    root.mkdir()
    _tree(root, 40, 300)
    env = {**os.environ, "BACKER_HOME": str(tmp_path / "home")}
    env.pop("BACKER_DEBUG", None)
    backer = [sys.executable, "-m", "backer"]
    database = root / ".backer" / "backer.db"
    init = subprocess.Popen(
        [*backer, "init", str(root), "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    recorded = 0
    try:
        deadline = time.monotonic() + 120
        while recorded == 0 and init.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
            recorded = _versions(database)
        os.kill(init.pid, signal.SIGKILL)
    finally:
        init.wait()
    assert 0 < recorded < 40 + 12_000, "the init was not caught between two batches"
    again = subprocess.run(
        [*backer, "init", str(root)], env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr
    assert "is a share already" in again.stdout
    scan = subprocess.run(
        [*backer, "scan", "--dir", str(root), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert scan.returncode == 0, scan.stderr
    with contextlib.closing(sqlite3.connect(database)) as conn:
        paths = Counter(path for (path,) in conn.execute("SELECT path FROM live"))
        versions = conn.execute("SELECT count(*) FROM versions").fetchone()[0]
        cached = conn.execute("SELECT count(*) FROM local").fetchone()[0]
    assert len(paths) == 40 + 12_000
    assert set(paths.values()) == {1}  # no conflict
    assert versions == 40 + 12_000  # nothing recorded twice
    assert cached == 40 + 12_000


def _versions(database: Path) -> int:
    """Versions recorded so far by a running init (0 while its database is not there)."""
    if not database.exists():
        return 0
    try:
        uri = f"file:{database}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=0.1)) as conn:
            return conn.execute("SELECT count(*) FROM versions").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet, or being written
        return 0
