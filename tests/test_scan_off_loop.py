"""Scans of given paths only, and scans whose walk and hashing run off the event loop."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import nacl.signing
import pytest

from backer.model.records import Kind
from backer.model.share import Share
from backer.protocol.session import Session
from backer.scanner.content import manifest_of_bytes
from backer.scanner.ignore import temp_name
from tests.helpers import live, make_devices, pump, sync, waiting_for_chunks


def content_of(share: Share, path: str) -> bytes:
    (version,) = share.catalog.live_versions(path).values()
    return version.content


def test_partial_scan_records_exactly_the_named_paths(share: Share) -> None:
    root = share.root
    for name in ("a", "b", "x"):
        (root / name).write_bytes(b"old " + name.encode())
    (root / "d").mkdir()
    share.scan()
    (root / "a").write_bytes(b"new a, longer")
    (root / "b").unlink()
    (root / "d" / "new").write_bytes(b"new")
    (root / "x").write_bytes(b"x changed too, but not named")
    summary = share.scan(paths=["a", "b", "d/new"])
    # (d got a new entry: its time is recorded again, as directory times are kept)
    assert (summary.added, summary.modified, summary.deleted) == (["d/new"], ["a", "d"], ["b"])
    assert content_of(share, "x") == manifest_of_bytes(b"old x").id
    assert share.scan().modified == ["x"]  # the whole scan still finds it


def test_partial_scan_of_a_directory_covers_its_subtree_and_its_deletion(share: Share) -> None:
    root = share.root
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "e" / "f").write_bytes(b"f")
    (root / "d" / "g").write_bytes(b"g")
    share.scan()
    (root / "d" / "e" / "h").write_bytes(b"h")
    (root / "d" / "g").write_bytes(b"g changed")
    assert share.scan(paths=["d"]).added == ["d/e/h"]
    assert share.scan(paths=["d"]).events == 0
    for path in ("d/e/f", "d/e/h", "d/g"):
        (root / path).unlink()
    (root / "d" / "e").rmdir()
    (root / "d").rmdir()
    summary = share.scan(paths=["d"])
    assert sorted(summary.deleted) == ["d", "d/e", "d/e/f", "d/e/h", "d/g"]
    assert share.scan().events == 0


def test_partial_scan_of_a_path_in_a_new_directory_scans_from_that_directory(
    share: Share,
) -> None:
    root = share.root
    (root / "n" / "m").mkdir(parents=True)
    (root / "n" / "m" / "f").write_bytes(b"f")
    (root / "n" / "sibling").write_bytes(b"s")
    summary = share.scan(paths=["n/m/f"])
    assert sorted(summary.added) == ["n", "n/m", "n/m/f", "n/sibling"]


def test_partial_scan_where_a_directory_became_a_file(share: Share) -> None:
    root = share.root
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"f")
    share.scan()
    (root / "d" / "f").unlink()
    (root / "d").rmdir()
    (root / "d").write_bytes(b"now a file")
    summary = share.scan(paths=["d/f"])
    assert (summary.modified, summary.deleted) == (["d"], ["d/f"])
    assert live(share)["d"].kind == Kind.FILE


def test_partial_scan_of_the_ignore_file_scans_everything(share: Share) -> None:
    root = share.root
    (root / "keep").write_bytes(b"k")
    (root / "build").write_bytes(b"b")
    share.scan()
    (root / ".backerignore").write_text("build\n")
    (root / "other").write_bytes(b"o")
    summary = share.scan(paths=[".backerignore"])
    assert sorted(summary.added) == [".backerignore", "other"]
    assert summary.deleted == []  # a rule forgets, never deletes
    assert "build" not in share.catalog.local_entries()


def test_partial_scan_keeps_the_problems_of_paths_it_did_not_look_at(share: Share) -> None:
    root = share.root
    (root / "A.txt").write_bytes(b"1")
    (root / "a.txt").write_bytes(b"2")
    share.scan()
    assert [p.path for _, p, _ in share.catalog.problems("scan")] == ["a.txt"]
    (root / "z").write_bytes(b"z")
    share.scan(paths=["z"])
    assert [p.path for _, p, _ in share.catalog.problems("scan")] == ["a.txt"]
    (root / "A.txt").unlink()
    share.scan(paths=["A.txt", "a.txt"])
    assert share.catalog.problems("scan") == []


def test_scan_off_loop_records_like_scan(share: Share) -> None:
    root = share.root
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"f" * 100)
    reports: list[tuple[int, int, int, int]] = []
    summary = asyncio.run(share.scan_off_loop(progress=lambda *r: reports.append(r)))
    assert sorted(summary.added) == ["d", "d/f"]
    assert reports[-1] == (1, 1, 100, 100)
    (root / "d" / "f").unlink()
    summary = asyncio.run(share.scan_off_loop(["d/f"]))
    assert summary.deleted == ["d/f"]


def test_scan_off_loop_leaves_the_loop_free_while_it_hashes(share: Share) -> None:
    for n in range(4):
        (share.root / f"big{n}").write_bytes(os.urandom(16 * 1024 * 1024))

    async def main() -> tuple[float, int]:
        gaps: list[float] = []
        scan = asyncio.create_task(share.scan_off_loop())
        last = time.monotonic()
        while not scan.done():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now
        return max(gaps), len((await scan).added)

    longest, added = asyncio.run(main())
    assert added == 4
    assert longest < 0.25  # hashing 64 MiB in the loop would hold it far longer


def test_apply_between_hash_and_commit_is_not_undone_by_the_scan(tmp_path: Path) -> None:
    """A remote version applied while an off-loop scan had hashed the old bytes: the
    scan must not put the old version back in the scan cache (which would make the
    next scan record the remote bytes as a local edit of the old version)."""
    a, b = make_devices(tmp_path, 2)
    (a.root / "f").write_bytes(b"version one")
    sync(a, b)
    (b.root / "f").write_bytes(b"version two, from b")
    b.scan()
    cached = a.catalog.local_entries(["f"])["f"]
    with a.db.conn:  # as after a write within the mtime granularity: hashed again
        a.catalog.set_local([cached._replace(settled=False)])
    applied = []

    def apply_now(*_: int) -> None:
        if not applied:
            pump(Session(a, "a"), Session(b, "b"))
            applied.append((a.root / "f").read_bytes())

    summary = asyncio.run(a.scan_off_loop(progress=apply_now))
    assert applied == [b"version two, from b"]
    assert summary.events == 0
    (remote,) = b.catalog.live_versions("f")
    assert a.catalog.local_entries(["f"])["f"].version_id == remote
    assert a.scan().events == 0
    assert list(a.catalog.live_versions("f")) == [remote]


def test_file_changed_again_between_hash_and_commit_is_not_recorded_from_old_bytes(
    share: Share,
) -> None:
    path = share.root / "f"
    path.write_bytes(b"one")
    share.scan()
    path.write_bytes(b"two, longer")
    position = share.journal.position()

    def write_again(*_: int) -> None:
        if path.read_bytes() != b"three, longer still":
            path.write_bytes(b"three, longer still")

    summary = asyncio.run(share.scan_off_loop(progress=write_again))
    assert summary.modified == ["f"]
    assert content_of(share, "f") == manifest_of_bytes(b"three, longer still").id
    versions = [v for _, _, v in share.catalog.versions_at(share.journal.position())]
    assert len(versions) == 1 and share.journal.position() == position + 1


def test_partial_scan_never_follows_a_directory_replaced_by_a_link(
    share: Share, tmp_path: Path
) -> None:
    root = share.root
    (root / "a").mkdir()
    (root / "a" / "b").write_bytes(b"mine")
    share.scan()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "b").write_bytes(b"secret outside the share")
    (root / "a" / "b").unlink()
    (root / "a").rmdir()
    (root / "a").symlink_to(outside)
    summary = share.scan(paths=["a/b"])
    assert (summary.modified, summary.deleted) == (["a"], ["a/b"])
    assert live(share)["a"].kind == Kind.SYMLINK
    secret = manifest_of_bytes(b"secret outside the share").id
    assert all(v.content != secret for v in live(share).values())


def test_partial_scan_skips_named_paths_that_are_ignored_temp_or_metadata(share: Share) -> None:
    root = share.root
    (root / ".backerignore").write_text("build/\n")
    (root / "build").mkdir()
    (root / "build" / "out.o").write_bytes(b"o")
    share.scan()
    (root / "build" / "new.o").write_bytes(b"n")
    (root / temp_name("f", "v1")).write_bytes(b"t")
    summary = share.scan(paths=["build/new.o", temp_name("f", "v1"), ".backer/backer.db", "../x"])
    assert (summary.added, summary.modified, summary.deleted, summary.events) == ([], [], [], 0)


def test_a_cancelled_off_loop_scan_stops_its_thread_and_records_nothing(share: Share) -> None:
    for n in range(300):
        (share.root / f"f{n}").write_bytes(os.urandom(256 * 1024))
    position = share.journal.position()

    async def main() -> None:
        started = asyncio.Event()
        scan = asyncio.create_task(share.scan_off_loop(progress=lambda *_: started.set()))
        await started.wait()
        scan.cancel()
        with pytest.raises(asyncio.CancelledError):
            await scan

    began = time.monotonic()
    asyncio.run(main())  # returns once the worker thread has ended
    cancelled = time.monotonic() - began
    assert share.journal.position() == position
    began = time.monotonic()
    assert len(share.scan().added) == 300
    assert cancelled < (time.monotonic() - began) / 2


def test_a_directory_applied_by_a_waiting_window_then_renamed_is_recorded_as_deleted(
    tmp_path: Path,
) -> None:
    """A window records the directories it makes when it starts, then waits for chunks;
    uncommitted, they were absent for the off-loop scan's reader, so the person's rename
    of one was recorded as the new name only and the old one's deletion was lost
    (simulation seed 6248)."""
    a, b = make_devices(tmp_path, 2)
    (a.root / "d").mkdir()
    (a.root / "big").write_bytes(os.urandom(300_000))  # a window that waits for chunks
    a.scan()
    b.scan()
    _waiting = waiting_for_chunks(a, b)
    assert (b.root / "d").is_dir()
    (b.root / "d").rename(b.root / "e")
    summary = asyncio.run(b.scan_off_loop(paths=["d", "e"]))
    assert (summary.added, summary.deleted) == (["e"], ["d"])


def test_R24_an_edit_through_one_name_of_a_hard_link_records_every_name(share: Share) -> None:
    """The watcher names only the path written; the other names hold the same new bytes
    and are recorded in the same partial scan (in the loop's worker thread too)."""
    root = share.root
    (root / "d").mkdir()
    (root / "hl1.txt").write_bytes(b"one\n")
    os.link(root / "hl1.txt", root / "d" / "hl2.txt")
    os.link(root / "hl1.txt", root / "hl3.txt")
    share.scan()
    with open(root / "hl1.txt", "ab") as f:
        f.write(b"more\n")
    summary = share.scan(paths=["hl1.txt"])
    assert sorted(summary.modified) == ["d/hl2.txt", "hl1.txt", "hl3.txt"]
    new = manifest_of_bytes(b"one\nmore\n").id
    assert {content_of(share, p) for p in ("hl1.txt", "d/hl2.txt", "hl3.txt")} == {new}
    with open(root / "d" / "hl2.txt", "ab") as f:
        f.write(b"again\n")
    summary = asyncio.run(share.scan_off_loop(paths=["d/hl2.txt"]))
    assert sorted(summary.modified) == ["d/hl2.txt", "hl1.txt", "hl3.txt"]
    assert share.scan().events == 0


def test_a_deletion_is_recorded_by_the_scan_during_which_a_restored_share_catches_up(
    tmp_path: Path,
) -> None:
    """A device restored from an older copy of ``.backer/`` waits for its own newer
    events; its person deletes a file those events recorded, and the watcher's scan
    starts. The events come back from a peer while the scan hashes: its walk had
    compared the disk with the older copy, which knew nothing of the file, so the
    deletion went unrecorded until a whole scan (seed 140717 of the campaign)."""
    key, home = nacl.signing.SigningKey.generate(), tmp_path / "home-a"
    (tmp_path / "a").mkdir()
    a = Share.create(tmp_path / "a", key, home=home)
    b_key = nacl.signing.SigningKey.generate()
    a.admit(bytes(b_key.verify_key), "b")
    (tmp_path / "b").mkdir()
    b = Share.create(tmp_path / "b", b_key, joining=(a.share_id, a.share_key))
    a.close()
    backup = tmp_path / "backup"
    shutil.copytree(tmp_path / "a" / ".backer", backup)
    a = Share(tmp_path / "a", key, home=home)
    (a.root / "f").write_bytes(b"recorded after the backup")
    a.scan()
    pump(Session(a, "a"), Session(b, "b"))
    a.close()
    shutil.rmtree(a.root / ".backer")
    shutil.copytree(backup, a.root / ".backer")
    a = Share(tmp_path / "a", key, home=home)
    assert a.own_events_missing
    (a.root / "f").unlink()
    (a.root / "g").write_bytes(b"a file to hash")
    given_back = []

    def give_back(*_: int) -> None:
        if not given_back:
            pump(Session(a, "a"), Session(b, "b"))
            given_back.append(a.own_events_missing)

    summary = asyncio.run(a.scan_off_loop(progress=give_back))
    assert given_back == [0]
    assert (summary.added, summary.deleted) == (["g"], ["f"])
    assert a.scan().events == 0


def test_a_rule_removed_while_a_scan_hashes_leaves_what_it_ignored_to_the_next_scan(
    tmp_path: Path,
) -> None:
    """The walk reads the ignore rules as it starts. A peer's removal of the rule that
    ignored the person's ``a/x.log`` here, applied while the watcher's scan hashes,
    leaves that file to the next scan, which the rules file's change makes a whole one
    (the watcher hears it go): recorded then, once, as the person's file. (The
    simulation took that record for the node's own applied write: seed 185151.)"""
    a, b = make_devices(tmp_path, 2)
    (a.root / ".backerignore").write_text("*.log\n")
    an_hour_ago = time.time() - 3600  # (a rule written just now is hashed again: its
    os.utime(a.root / ".backerignore", (an_hour_ago, an_hour_ago))  # rescan is whole)
    sync(a, b)
    (b.root / "a").mkdir()
    (b.root / "a" / "x.log").write_bytes(b"the person's log, ignored as written")
    (b.root / "g").write_bytes(b"a file to hash")
    (a.root / ".backerignore").unlink()
    a.scan()
    arrived = []

    def bring_the_removal(*_: int) -> None:
        if not arrived:
            pump(Session(a, "a"), Session(b, "b"))
            arrived.append((b.root / ".backerignore").exists())

    summary = asyncio.run(b.scan_off_loop(progress=bring_the_removal))
    assert arrived == [False]
    assert summary.added == ["a", "g"]
    assert b.scan(paths=[".backerignore"]).added == ["a/x.log"]
    assert b.scan().events == 0
