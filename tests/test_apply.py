"""Applying received versions to disk: every entry kind on every path, checked writes,
verified files (kept contents: see test_versioner_store)."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import nacl.signing
import pytest

from backer.db.catalog import Catalog
from backer.model import materializer
from backer.model.materializer import Materializer, Operation, conflict_path, data_chunks, verify
from backer.model.records import Kind, Version
from backer.model.replicator import Replicator
from backer.model.share import Share
from backer.protocol.session import Session
from backer.scanner import chunks
from backer.scanner.chunks import ChunkStore
from backer.scanner.content import manifest_of_bytes
from backer.scanner.ignore import is_temp_name, temp_name
from tests.helpers import Links, make_devices, pump, small_disk, sync, tree, waiting_for_chunks


def test_links_mixed_with_files_above_the_syncfs_threshold_are_applied(tmp_path: Path) -> None:
    """A staged link met the per-file fsync path (O_NOFOLLOW on a link: ELOOP) and the
    whole session failed."""
    a, b = make_devices(tmp_path, 2)
    (a.root / "big").write_bytes(os.urandom(3 * 1024 * 1024))
    (a.root / "also-big").write_bytes(os.urandom(2 * 1024 * 1024))
    os.symlink("big", a.root / "link")
    os.symlink("nowhere", a.root / "dangling")
    sync(a, b)
    assert tree(a.root) == tree(b.root)
    (a.root / "link").unlink()
    os.symlink("also-big", a.root / "link")
    (a.root / "big").write_bytes(os.urandom(3 * 1024 * 1024))
    _, right = sync(a, b)
    assert tree(a.root) == tree(b.root)
    assert not [r.errors for r in right.replicator.reports if r.errors]


def _pair_on(tmp_path: Path, replica_root: Path) -> tuple[Share, Share]:
    """A founder under ``tmp_path`` and a member whose share lives at ``replica_root``."""
    a_key, b_key = nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate()
    (tmp_path / "a").mkdir()
    replica_root.mkdir()
    a = Share.create(tmp_path / "a", a_key)
    a.admit(bytes(b_key.verify_key), "b")
    return a, Share.create(replica_root, b_key, joining=(a.share_id, a.share_key))


def _same_or_absent(source: Path, replica: Path) -> None:
    theirs = tree(source)
    for path, entry in tree(replica).items():
        assert entry == theirs[path], path
    assert not [p for p in replica.rglob("*") if is_temp_name(p.name)]


def _filled_mid_transfer(tmp_path: Path, disk: Path) -> tuple[Share, Share, Session, Links]:
    """a sends four 2 MiB files to b on ``disk``; once b's window is open, another
    program fills the disk to 3 MiB short of full."""
    a, b = _pair_on(tmp_path, disk / "b")
    for n in range(4):
        (a.root / f"f{n}.bin").write_bytes(os.urandom(2 * 1024 * 1024 + 1000 * n))
    a.scan()
    b.scan()
    left, right = Session(a, "a"), Session(b, "b")
    links = Links([(left, right)])
    for _ in range(100):
        if right.replicator.assembly is not None:
            break
        links.step()
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as filler:
        filler.write(b"x" * (free - 3 * 1024 * 1024))
    return a, b, right, links


def test_a_disk_that_fills_mid_transfer_stops_it_with_nothing_torn_and_a_later_sync_finishes(
    tmp_path: Path,
) -> None:
    """Writes were unchecked: a short write at ENOSPC left zeros that were recorded."""
    with small_disk(tmp_path / "disk", "32m") as disk:
        a, b, right, links = _filled_mid_transfer(tmp_path, disk)
        links.run()
        problem = right.replicator.disk_full
        assert problem is not None and str(problem).startswith("disk full: ")
        assert f"MB more needed in {b.root}" in str(problem)
        _same_or_absent(a.root, b.root)
        assert len(tree(b.root)) < 4
        b.scan()
        assert all(
            v.content == a.catalog.live_versions(p).popitem()[1].content
            for p, _, v in b.catalog.all_live()
        )
        (disk / "filler").unlink()
        _, right = sync(a, b)
        assert tree(a.root) == tree(b.root)


def test_a_file_too_big_for_the_disk_is_left_out_and_the_others_still_arrive(
    tmp_path: Path,
) -> None:
    """A file that did not fit stopped the whole plan, every later file with it, and a
    resident node said nothing: one big file starved the device of every change."""
    with small_disk(tmp_path / "disk", "24m") as disk:
        a, b = _pair_on(tmp_path, disk / "b")
        (a.root / "a-huge.bin").write_bytes(os.urandom(30 * 1024 * 1024))
        for n in range(5):
            (a.root / f"small{n}.txt").write_text(f"small {n}")
        a.scan()
        b.scan()
        _, right = sync(a, b)
        problem = right.replicator.disk_full
        assert problem is not None and f"MB more needed in {b.root}" in str(problem)
        assert not (b.root / "a-huge.bin").exists()
        for n in range(5):
            assert (b.root / f"small{n}.txt").read_text() == f"small {n}"
        assert [problem.path for _, problem, _ in b.catalog.problems()] == ["a-huge.bin"]
        assert not [p for p in b.root.rglob("*") if is_temp_name(p.name)]


def test_verify_rejects_a_file_whose_bytes_differ_from_its_manifest(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    (tmp_path / "f").write_bytes(data)
    manifest = manifest_of_bytes(data)

    def check() -> None:
        fd = os.open(tmp_path / "f", os.O_RDONLY)
        try:
            verify(fd, manifest)
        finally:
            os.close(fd)

    check()
    with open(tmp_path / "f", "r+b") as handle:
        handle.seek(200_000)
        handle.write(b"\0" * 4096)
    with pytest.raises(ValueError, match="do not match"):
        check()
    os.truncate(tmp_path / "f", 100)
    with pytest.raises(ValueError, match="wrong size"):
        check()


def test_a_sparse_file_arrives_sparse_and_its_holes_are_not_fetched(tmp_path: Path) -> None:
    """A 1 GiB file with 12 KiB allocated arrived fully allocated."""
    a, b = make_devices(tmp_path, 2)
    with open(a.root / "disk.img", "wb") as handle:
        handle.truncate(64 * 1024 * 1024)
        for offset in (0, 20 * 1024 * 1024, 63 * 1024 * 1024):
            handle.seek(offset)
            handle.write(os.urandom(4096))
    _, right = sync(a, b)
    assert tree(a.root) == tree(b.root)
    assert (b.root / "disk.img").stat().st_blocks * 512 < 4 * 1024 * 1024
    assert right.stats.chunk_bytes_received < 2 * 1024 * 1024


def test_a_symlink_keeps_its_own_modification_time(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    (a.root / "target.txt").write_text("t")
    os.symlink("target.txt", a.root / "link")
    os.utime(a.root / "link", ns=(1_500_000_000_000_000_000,) * 2, follow_symlinks=False)
    sync(a, b)
    assert tree(a.root) == tree(b.root)
    assert (b.root / "link").lstat().st_mtime_ns == 1_500_000_000_000_000_000
    assert (b.root / "target.txt").stat().st_mtime_ns == (a.root / "target.txt").stat().st_mtime_ns


def _mtimes(root: Path, names: list[str]) -> list[int]:
    return [(root / name).lstat().st_mtime_ns for name in names]


def test_directory_mtimes_arrive_after_their_entries_and_are_no_change_to_record(
    tmp_path: Path,
) -> None:
    a, b = make_devices(tmp_path, 2)
    dirs = ["d", "d/e", "empty"]
    for name in dirs:
        (a.root / name).mkdir()
    (a.root / "d" / "e" / "f.txt").write_text("written after its directories")
    (a.root / "d" / "g.txt").write_text("g")
    for n, name in enumerate(reversed(dirs)):  # deepest first, as a restore would
        os.utime(a.root / name, ns=(10**18 + n,) * 2)
    sync(a, b)
    assert _mtimes(b.root, dirs) == _mtimes(a.root, dirs)
    assert b.scan().events == 0  # the writes into d were backer's own
    (a.root / "d" / "h.txt").write_text("an entry added later")
    (a.root / "d" / "g.txt").unlink()
    os.utime(a.root / "d", ns=(2 * 10**18,) * 2)
    sync(a, b)
    assert tree(a.root) == tree(b.root)
    assert _mtimes(b.root, dirs) == _mtimes(a.root, dirs)
    assert b.scan().events == 0 and a.scan().events == 0


def test_a_deletion_planned_before_a_scan_never_removes_the_version_that_scan_recorded(
    tmp_path: Path,
) -> None:
    """Deletions re-read the scan cache when applied: a file edited and scanned after
    the plan was deleted with its newer version (found by the simulations' strict check)."""
    a, b = make_devices(tmp_path, 2)
    (a.root / "f.txt").write_text("v1")
    sync(a, b)
    (a.root / "f.txt").unlink()
    (a.root / "g.bin").write_bytes(os.urandom(300_000))  # a window that waits for chunks
    a.scan()
    b.scan()
    _, right, links = waiting_for_chunks(a, b)
    (b.root / "f.txt").write_text("edited on b after the plan")
    assert b.scan().added == ["f.txt"]  # (live is the deletion, so it counts as added)
    links.run()
    assert not [r for r in right.replicator.reports if "f.txt" in r.deleted + r.written]
    assert (b.root / "f.txt").read_text() == "edited on b after the plan"
    sync(a, b)
    assert tree(a.root) == tree(b.root)
    assert (a.root / "f.txt").read_text() == "edited on b after the plan"


def test_a_file_recorded_then_deleted_while_a_window_waits_is_not_written_over(
    tmp_path: Path,
) -> None:
    """A window checks each file's scan-cache entry again when it moves it into place: a
    window that began before the person's file was recorded wrote the peer's version
    where the person had deleted it since, and the deletion was never recorded (the
    recorded version stayed live, its bytes indexed nowhere: simulation CI seed 7)."""
    a, b = make_devices(tmp_path, 2)
    (a.root / "f.txt").write_text("from a")
    (a.root / "g.bin").write_bytes(os.urandom(300_000))  # a window that waits for chunks
    a.scan()
    b.scan()
    _, right, links = waiting_for_chunks(a, b)
    (b.root / "f.txt").write_text("written on b")
    assert b.scan().modified == ["f.txt"]  # concurrent with a's version
    (b.root / "f.txt").unlink()
    links.run()
    assert not (b.root / "f.txt").exists()
    assert any("f.txt" in report.kept_local_edits for report in right.replicator.reports)
    assert b.scan().deleted == ["f.txt"]
    sync(a, b)
    sync(a, b)
    assert tree(a.root) == tree(b.root)
    texts = [data for kind, data, _ in tree(b.root).values() if len(data) < 100]
    assert texts == [b"from a"]  # (at f.txt or as its conflict copy: b's was deleted)


def test_a_conflict_on_a_255_byte_name_gets_a_copy_that_fits_name_max(tmp_path: Path) -> None:
    """The copy's name added 33 bytes to the original's: it could never be written."""
    a, b = make_devices(tmp_path, 2)
    name = "ü" * 120 + "n" * 11 + ".txt"  # 255 bytes
    (a.root / name).write_text("base")
    sync(a, b)
    (a.root / name).write_text("edited on a")
    (b.root / name).write_text("edited on b, longer")
    sync(a, b)
    _, right = sync(a, b)
    assert tree(a.root) == tree(b.root)
    (copy,) = [p for p in tree(a.root) if ".sync-conflict-" in p]
    assert len(os.fsencode(copy)) <= 255 and copy.endswith(".txt")
    assert not [r.errors for r in right.replicator.reports if r.errors]


@pytest.mark.parametrize("name", ["m" * 250 + ".txt", "m" * 240])
def test_a_long_conflict_copy_never_names_itself_nor_an_earlier_copy(name: str) -> None:
    """A copy of a copy whose name was cut to NAME_MAX came out as the very same name
    (simulation seed 5278), or as the name of the copy two steps before it (seed 130395):
    every resolution wrote a new conflict at that path, for ever (devices linked by
    `backer run` resolved it back and forth without end)."""
    version = Version(Kind.FILE, 4, content=b"\1" * 32, device=b"d" * 32, time_ms=1_767_225_600)
    path = "a/" + name
    line = [path]
    for _ in range(8):  # a copy of a copy of a copy...: always a new name, still fitting
        copy = conflict_path(path, version)
        assert copy not in line and len(os.fsencode(copy.rpartition("/")[2])) <= 255, line
        line.append(copy)
        path = copy


def test_a_rule_added_while_a_plan_waits_for_chunks_binds_that_plan(tmp_path: Path) -> None:
    """A plan made before the person ignored a path still wrote (and deleted) it once its
    chunks came: the person's ignored file was replaced (simulation seed 38)."""
    a, b = make_devices(tmp_path, 2)
    (a.root / "g").write_text("v1")
    (a.root / "h").write_text("kept")
    sync(a, b)
    (a.root / "g").write_bytes(os.urandom(300_000))  # a window that waits for chunks
    (a.root / "h").unlink()
    a.scan()
    b.scan()
    *_, links = waiting_for_chunks(a, b)
    (b.root / ".backerignore").write_text("g\nh\n")
    links.run()
    assert (b.root / "g").read_text() == "v1"
    assert (b.root / "h").read_text() == "kept"
    assert not [p for p in b.root.rglob("*") if is_temp_name(p.name)]


def test_a_conflict_resolved_by_a_plan_that_a_full_disk_stops_still_reaches_the_peer(
    tmp_path: Path,
) -> None:
    """A plan's conflict resolution is an event of this device, pushed when the plan
    ends; a full disk stopped the plan before that, and a peer on an open link never got
    the event (simulation seed 6240). Here both devices share the disk that fills."""
    with small_disk(tmp_path / "disk", "32m") as disk:
        a, b = _pair_on(disk, disk / "b")
        (a.root / "f").write_text("one")
        sync(a, b)
        (a.root / "f").write_text("two on a")
        (b.root / "f").write_text("two on b")
        for n, share in enumerate((a, b, a, b)):  # windows on both sides wait for chunks
            (share.root / f"f{n}.bin").write_bytes(os.urandom(2 * 1024 * 1024 + 1000 * n))
        a.scan()
        b.scan()
        left, right = Session(a, "a"), Session(b, "b")
        links = Links([(left, right)])
        for _ in range(100):
            if left.replicator.assembly is not None and right.replicator.assembly is not None:
                break
            links.step()
        assert left.replicator.stats.conflicts_resolved
        assert right.replicator.stats.conflicts_resolved
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        with open(disk / "filler", "wb") as filler:  # another program fills the disk
            filler.write(b"x" * (free - 3 * 1024 * 1024))
        links.run()
        assert left.replicator.disk_full is not None and right.replicator.disk_full is not None
        ours, theirs = (
            {author: c.length for author, c in s.journal.summary().items()} for s in (a, b)
        )
        assert ours == theirs


def test_a_missing_parent_a_scan_recorded_meanwhile_is_not_removed_behind_its_back(
    tmp_path: Path,
) -> None:
    """A window made a missing parent for a file whose chunks then never came, and
    removed it as unused when it ended; a scan had recorded the directory meanwhile, so
    the next scan recorded its deletion, which nobody made (simulation seed 6224)."""
    a, b = make_devices(tmp_path, 2)
    (a.root / "d").mkdir()
    (a.root / "d" / "f").write_text("one")
    sync(a, b)
    for child in (b.root / "d").iterdir():
        child.unlink()
    (b.root / "d").rmdir()
    b.scan()  # deleted on b, while a writes inside: d/f stays live, d does not
    (a.root / "d" / "f").write_bytes(os.urandom(300_000))
    a.scan()
    *_, links = waiting_for_chunks(a, b)
    assert (b.root / "d").is_dir()
    (a.root / "d" / "f").write_bytes(os.urandom(300_000))  # a's chunks are gone
    assert b.scan(paths=["d"]).added == ["d"]
    links.run()
    assert not b.scan().deleted


def _insert(path: Path, at: int, data: bytes) -> None:
    old = path.read_bytes()
    path.write_bytes(old[:at] + data + old[at:])


def test_a_shifted_insert_is_copied_from_the_old_file_in_runs_and_only_its_chunk_fetched(
    tmp_path: Path,
) -> None:
    """B rebuilt a changed file chunk by chunk (one index query, one open, one read and
    one write per 64 KiB) and hashed a buffer of zeros twice per chunk: 1.8 × rsync's time
    for a 10-byte insert with the node running."""
    a, b = make_devices(tmp_path, 2)
    (a.root / "big.bin").write_bytes(os.urandom(8 * 1024 * 1024))
    sync(a, b)
    _insert(a.root / "big.bin", 4 * 1024 * 1024, b"0123456789")
    a.scan()
    vid = a.catalog.local_entries(["big.bin"])["big.bin"].version_id
    live = {v: version for p, v, version in a.catalog.all_live() if p == "big.bin"}
    manifest = a.catalog.manifest(live[vid].content)
    assert manifest is not None
    runs = ChunkStore(b.root, b.catalog).locate(data_chunks(manifest))
    assert len(runs) <= 2  # before the insert, after it (the chunk holding it is new)
    assert sum(len(run.chunks) for run in runs) >= len(manifest.chunks) - 3
    _, right = sync(a, b)
    assert tree(a.root) == tree(b.root)
    assert right.stats.chunks_fetched <= 3
    assert not [r.errors for r in right.replicator.reports if r.errors]


def _window_copying(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writeback_s: float = 0.1
) -> tuple[Share, Share, Session, Links, threading.Event, list[int]]:
    """B's window for a 10-byte insert into a 32 MiB file, opened as a node opens it
    (a ``wake`` set: nothing waits for the copy), on a disk whose queue is full (each
    MiB's writeback start waits ``writeback_s``, as ``sync_file_range`` does then); the
    list grows by one as each writeback starts."""
    a, b = make_devices(tmp_path, 2)
    (a.root / "big.bin").write_bytes(os.urandom(32 * 1024 * 1024))
    sync(a, b)
    _insert(a.root / "big.bin", 16 * 1024 * 1024, b"0123456789")
    a.scan()
    writeback = chunks.start_writeback

    started: list[int] = []

    def full_queue(fd: int, offset: int, length: int) -> None:
        started.append(offset)
        time.sleep(writeback_s)
        writeback(fd, offset, length)

    monkeypatch.setattr(chunks, "start_writeback", full_queue)
    left, right = Session(a, "a"), Session(b, "b")
    woken = threading.Event()
    right.replicator.wake = woken.set
    return a, b, right, Links([(left, right)]), woken, started


def _open_window(right: Session, links: Links) -> None:
    for _ in range(100):
        if right.replicator.assembly is not None:
            return
        links.step()


def test_a_stop_during_a_long_local_copy_ends_at_once_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B copied a changed file's old chunks on the event loop, starting each MiB's
    writeback, which blocks while the disk queue is full: a SIGTERM mid-transfer took
    9.6 s to end (limit 5 s). The copy runs in a worker thread and stops between two
    pieces: the stop waits for one MiB's writeback at most, never for the whole copy
    (counted, not timed: a loaded machine took 1.5 s to open the window)."""
    _, b, right, links, _, writebacks = _window_copying(tmp_path, monkeypatch, 0.5)
    _open_window(right, links)
    assert [p for p in b.root.iterdir() if is_temp_name(p.name)]
    before = len(writebacks)
    right.replicator.abandon()
    assert len(writebacks) - before <= 1 and len(writebacks) < 32, (before, len(writebacks))
    assert not [p for p in b.root.rglob("*") if is_temp_name(p.name)]
    assert b.scan().events == 0  # the old file untouched


def test_a_window_whose_local_copy_ends_later_is_finished_when_the_copy_wakes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the copy off the event loop the window must not finish before it (nor be
    forgotten after it): the copy's end calls ``wake``, and the node moves on."""
    a, b, right, links, woken, _ = _window_copying(tmp_path, monkeypatch)
    _open_window(right, links)
    links.run()
    assert right.replicator.operations is not None  # the copy still runs: not finished
    assert woken.wait(30)
    for _ in range(100):  # (the early check that follows the copy wakes it too)
        right.replicator.advance()
        links.run()
        if right.replicator.operations is None:
            break
        time.sleep(0.05)
    assert tree(a.root) == tree(b.root)
    assert not [r.errors for r in right.replicator.reports if r.errors]


def test_a_large_file_complete_is_moved_into_place_while_the_next_one_is_still_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B moved the files of a window into place one after another once the last had
    arrived: with a 10-byte insert into each of four 256 MiB files, each file's commit
    (its old chunks' rows moved to the store entry, its own inserted, 0.12-0.6 s) waited
    for every copy and then for the commits before it. A large file whose early check
    has passed is now committed at once, and recorded, while the next one is copied."""
    monkeypatch.setattr(materializer, "CHECK_EARLY", 200_000)
    a, b = make_devices(tmp_path, 2)
    for name in ("first.bin", "second.bin"):
        (a.root / name).write_bytes(os.urandom(4 * 1024 * 1024))
    sync(a, b)
    for name in ("first.bin", "second.bin"):
        _insert(a.root / name, 2 * 1024 * 1024, b"0123456789")
    a.scan()
    release, copy = threading.Event(), materializer._copy_local

    def held(
        store: ChunkStore, fd: int, runs: list[chunks.Run], stop: threading.Event
    ) -> materializer._Copied:
        if runs[0].source == "second.bin":
            release.wait(30)
        return copy(store, fd, runs, stop)

    monkeypatch.setattr(materializer, "_copy_local", held)
    left, right = Session(a, "a"), Session(b, "b")
    woken = threading.Event()
    right.replicator.wake = woken.set
    links = Links([(left, right)])
    try:
        for _ in range(100):  # (bounded: 100 x 0.05 s)
            links.run()
            right.replicator.advance()
            if (b.root / "first.bin").read_bytes() == (a.root / "first.bin").read_bytes():
                break
            woken.wait(0.05)
            woken.clear()
        assert (b.root / "first.bin").read_bytes() == (a.root / "first.bin").read_bytes()
        assert right.replicator.operations is not None  # the second one still copies
        assert not b.db.conn.in_transaction  # recorded, and committed
        assert b.scan().events == 0  # recorded as the version it is
    finally:
        release.set()
    for _ in range(100):
        links.run()
        right.replicator.advance()
        if right.replicator.operations is None:
            break
        woken.wait(0.05)
        woken.clear()
    assert tree(a.root) == tree(b.root)
    assert not [r.errors for r in right.replicator.reports if r.errors]


def test_a_local_chunk_changed_since_its_scan_is_fetched_not_copied(tmp_path: Path) -> None:
    """Copied chunks are checked as they are copied: a source whose bytes changed
    since it was indexed must not end up in the file."""
    a, b = make_devices(tmp_path, 2)
    content = os.urandom(2 * 1024 * 1024)
    (a.root / "old.bin").write_bytes(content)
    sync(a, b)
    (a.root / "new.bin").write_bytes(content + b"tail")
    a.scan()
    with open(b.root / "old.bin", "r+b") as handle:  # changed on B, not rescanned yet
        handle.write(os.urandom(len(content)))
    left, right = Session(a, "a"), Session(b, "b")
    pump(left, right)
    assert (b.root / "new.bin").read_bytes() == content + b"tail"
    assert right.stats.chunk_bytes_received >= len(content)
    assert not [r.errors for r in right.replicator.reports if r.errors]


def test_only_a_run_of_zeros_or_a_last_chunk_is_taken_for_a_hole() -> None:
    """Every chunk's hash was compared with a hash of zeros of its length, computed per
    chunk (content-defined lengths almost never repeat): 2 GiB of zeros hashed for a
    1 GiB file."""
    data = os.urandom(300_000) + bytes(1024 * 1024) + os.urandom(200_000) + bytes(5000)
    manifest = manifest_of_bytes(data)
    kept = data_chunks(manifest)
    for ref in manifest.chunks:
        zero = data[ref.offset : ref.offset + ref.length] == bytes(ref.length)
        assert (ref not in kept) == zero, ref
    assert len(kept) < len(manifest.chunks) - 2


def test_a_plan_after_one_change_decodes_that_version_not_the_whole_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every plan decoded every live version three times (the plan itself and two
    conflict passes) and read the whole scan cache: on a 5,000-file share 0.6 s per
    change on each device, the latency that grew with the share."""
    a, b = make_devices(tmp_path, 2)
    for n in range(300):
        (a.root / f"d{n % 10}").mkdir(exist_ok=True)
        (a.root / f"d{n % 10}" / f"f{n}").write_text(str(n))
    sync(a, b)
    (a.root / "d0" / "new").write_text("new")
    a.scan()
    left, right = Session(a, "a"), Session(b, "b")
    decoded = []
    original = Version.decode.__func__  # type: ignore[attr-defined]

    def counting(cls: type[Version], data: bytes) -> Version:
        decoded.append(data)
        return original(cls, data)

    monkeypatch.setattr(Version, "decode", classmethod(counting))
    pump(left, right)
    assert (b.root / "d0" / "new").read_text() == "new"
    assert len(decoded) < 100  # (the share holds 310 live versions)


def test_a_file_made_where_a_directory_was_written_into_becomes_a_conflict_copy(
    tmp_path: Path,
) -> None:
    """The directory is needed by the entry written into it elsewhere: the file that
    shadows it moves to its conflict copy, on both devices alike."""
    a, b = make_devices(tmp_path, 2)
    (a.root / "d").mkdir()
    (a.root / "d" / "x").write_text("x")
    sync(a, b)
    (a.root / "d" / "x").unlink()
    (a.root / "d").rmdir()
    (a.root / "d").write_text("a file now")
    (b.root / "d" / "y").write_text("new inside")
    sync(a, b)
    sync(a, b)
    assert tree(a.root) == tree(b.root)
    assert (a.root / "d" / "y").read_text() == "new inside"
    (copy,) = [p for p in a.root.iterdir() if p.name.startswith("d.sync-conflict-")]
    assert copy.read_text() == "a file now"


def test_a_window_of_small_files_records_its_scan_cache_in_one_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each applied file wrote its scan-cache row and its chunk locations on its own
    (three statements per file): a tenth of a burst of 1,000 new files."""
    a, b = make_devices(tmp_path, 2)
    for n in range(200):
        (a.root / f"f{n:03d}").write_text(str(n))
    a.scan()
    b.scan()
    calls = []
    original = Catalog.set_local

    def counting(self: Catalog, entries: object) -> None:
        calls.append(entries)
        original(self, entries)  # type: ignore[arg-type]

    monkeypatch.setattr(Catalog, "set_local", counting)
    pump(Session(a, "a"), Session(b, "b"))
    assert tree(a.root) == tree(b.root)
    assert len(calls) < 10


def test_an_eio_removing_temps_when_the_disk_fills_ends_as_disk_full_not_an_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A window stopped by a full disk removes its temps; the failing disk then refused
    one of those removals too (EIO) and that error escaped instead of the disk-full
    problem (seed 11177). The temp it kept is resumed by the sync once there is room."""
    with small_disk(tmp_path / "disk", "32m") as disk:
        a, b, right, links = _filled_mid_transfer(tmp_path, disk)
        unlink = os.unlink

        def failing(path: str, *, dir_fd: int | None = None) -> None:
            if is_temp_name(os.path.basename(path)):
                raise OSError(errno.EIO, os.strerror(errno.EIO), path)
            unlink(path, dir_fd=dir_fd)

        monkeypatch.setattr(os, "unlink", failing)
        links.run()
        problem = right.replicator.disk_full
        assert problem is not None and str(problem).startswith("disk full: ")
        assert [p for p in b.root.rglob("*") if is_temp_name(p.name)]  # the EIO kept it
        monkeypatch.undo()
        (disk / "filler").unlink()
        sync(a, b)
        assert tree(a.root) == tree(b.root)
        assert not [p for p in b.root.rglob("*") if is_temp_name(p.name)]


def test_R18_a_stored_path_no_device_may_hold_is_noted_unwritable_not_retried(
    tmp_path: Path,
) -> None:
    """A version taken in before paths were bounded (a 304-byte name) fails its check
    on every plan: it is noted once and left out of the plans after."""
    (share,) = make_devices(tmp_path, 1)
    op = Operation("\u00e9" * 150 + ".txt", "v1", Version(Kind.DIRECTORY, permissions=0o755))
    store = ChunkStore(share.root, share.catalog)
    report = Materializer(share.root, share.catalog, store).start([op]).finish()
    assert [p.path for p in report.errors] == [op.path]
    assert report.unwritable == [(op.path, "v1")]


def test_a_received_chunk_whose_write_fails_in_the_writer_thread_drops_only_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Received chunks are written by a worker thread, not on the event loop; a write
    that fails there (EIO) is still raised where the chunk is counted: that file is
    reported and its temp removed, the other file of the window is applied."""
    a, b = make_devices(tmp_path, 2)
    good, bad = os.urandom(300_000), os.urandom(300_000)
    for name, data in (("good", good), ("bad", bad)):  # a temp file is beside its target
        (a.root / name).mkdir()
        (a.root / name / "f.bin").write_bytes(data)
    a.scan()
    b.scan()
    write_all, threads = materializer.write_all, set()

    def failing(fd: int, data: bytes | memoryview, offset: int) -> None:
        threads.add(threading.current_thread())
        if "/bad/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        write_all(fd, data, offset)

    monkeypatch.setattr(materializer, "write_all", failing)
    _, right = sync(a, b)
    assert threads and threading.main_thread() not in threads
    assert (b.root / "good" / "f.bin").read_bytes() == good
    assert not (b.root / "bad" / "f.bin").exists()
    assert not [p for p in b.root.rglob("*") if is_temp_name(p.name)]
    assert right.replicator.stats.files_written == 1


def test_a_windows_files_are_written_by_several_threads_each_file_by_one_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Creating a file is the slow step of a first sync of small files (hundreds of µs
    each on a busy disk): the window's files are spread over the writer threads, but
    every chunk of one file is written by the same thread, in offset order."""
    a, b = make_devices(tmp_path, 2)
    files = {f"d/f{index:02d}.bin": os.urandom(3_000 + 50_000 * (index % 3)) for index in range(40)}
    (a.root / "d").mkdir()
    for name, data in files.items():
        (a.root / name).write_bytes(data)
    a.scan()
    b.scan()
    write_all, writes = materializer.write_all, []

    def recorded(fd: int, data: bytes | memoryview, offset: int) -> None:
        writes.append((os.readlink(f"/proc/self/fd/{fd}"), threading.get_ident(), offset))
        write_all(fd, data, offset)

    monkeypatch.setattr(materializer, "write_all", recorded)
    sync(a, b)
    assert {name: (b.root / name).read_bytes() for name in files} == files
    by_temp: dict[str, list[tuple[int, int]]] = {}
    for temp, thread, offset in writes:
        by_temp.setdefault(temp, []).append((thread, offset))
    assert len(by_temp) == len(files)
    assert all(len({thread for thread, _ in chunks}) == 1 for chunks in by_temp.values())
    offsets = [[offset for _, offset in chunks] for chunks in by_temp.values()]
    assert all(each == sorted(each) for each in offsets)
    assert len({thread for _, thread, _ in writes}) > 1


def test_a_full_disk_met_by_the_fsync_of_a_windows_new_folders_is_disk_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fsync of the folders a window made ran after its disk-full guard: ENOSPC
    there escaped as an internal exception instead of the disk-full problem that stops
    the window and is retried once there is room (seed 80327)."""
    (share,) = make_devices(tmp_path, 1)
    op = Operation("new", "v1", Version(Kind.DIRECTORY, permissions=0o755))
    store = ChunkStore(share.root, share.catalog)
    fsync = os.fsync

    def full(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(materializer.DiskFull):
        Materializer(share.root, share.catalog, store).start([op])


def test_a_kept_temp_whose_folder_became_a_file_is_swept_as_gone(tmp_path: Path) -> None:
    """An interrupted transfer kept its temp in folder ``a/c``; the folder then became a
    file. Sweeping that temp met ENOTDIR, not ENOENT, and the error escaped the window
    being finished, or a stopping node's (found by the clocks simulation family, seed 37)."""
    [share] = make_devices(tmp_path, 1)
    folder = share.root / "a" / "c"
    folder.mkdir(parents=True)
    temp = folder / temp_name("a/c/h", "not-live")
    temp.write_bytes(b"verified chunks of a version since replaced")
    share.resumable_temps.add(temp)
    temp.unlink()
    folder.rmdir()
    folder.write_bytes(b"a file now")
    share.sweep_resumable()
    assert not share.resumable_temps
    share.resumable_temps.add(temp)  # and a node that stops gives up its kept temps
    Replicator(share).abandon()
    assert not share.resumable_temps
    assert folder.read_bytes() == b"a file now"
