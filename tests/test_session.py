"""Two and three devices syncing through the sans-IO session, in memory."""

from __future__ import annotations

import os
from pathlib import Path

from tests.helpers import make_devices, sync, tree


def test_initial_sync_copies_files_dirs_links_modes_and_empty_dirs(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    (a.root / "docs").mkdir()
    (a.root / "docs" / "report.txt").write_bytes(os.urandom(300_000))
    (a.root / "empty").mkdir()
    (a.root / "run.sh").write_text("#!/bin/sh\n")
    (a.root / "run.sh").chmod(0o755)
    os.symlink("docs/report.txt", a.root / "latest")
    _, right = sync(a, b)
    assert tree(a.root) == tree(b.root)
    assert right.replicator.stats.files_written == 3 and right.stats.chunk_bytes_received >= 300_000


def test_edits_on_both_sides_and_renames_move_no_chunk_bytes(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    (a.root / "album").mkdir()
    for n in range(20):
        (a.root / "album" / f"{n}.jpg").write_bytes(os.urandom(20_000))
    sync(a, b)
    (a.root / "album").rename(a.root / "photos")
    (b.root / "new-on-b.txt").write_text("from b")
    left, right = sync(a, b)
    assert tree(a.root) == tree(b.root)
    assert "photos/0.jpg" in tree(b.root) and "album" not in tree(b.root)
    assert right.stats.chunk_bytes_received == 0 and left.stats.chunk_bytes_received == 6


def test_concurrent_edits_become_the_same_conflict_copy_everywhere(tmp_path: Path) -> None:
    a, b, c = make_devices(tmp_path, 3)
    (a.root / "notes.txt").write_text("base")
    sync(a, b)
    sync(a, c)
    (a.root / "notes.txt").write_text("edited on a")
    (b.root / "notes.txt").write_text("edited on b, longer")
    sync(a, b)
    sync(b, c)
    sync(a, c)
    sync(a, b)
    trees = [tree(d.root) for d in (a, b, c)]
    assert trees[0] == trees[1] == trees[2]
    copies = [p for p in trees[0] if ".sync-conflict-" in p]
    assert (
        len(copies) == 1
        and copies[0].startswith("notes.sync-conflict-")
        and copies[0].endswith(".txt")
    )
    contents = {trees[0]["notes.txt"][1], trees[0][copies[0]][1]}
    assert contents == {b"edited on a", b"edited on b, longer"}
    assert all(d.catalog.conflicted_paths() == [] for d in (a, b, c))


def test_identical_concurrent_edits_are_not_a_conflict(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    sync(a, b)
    (a.root / "same.txt").write_text("same")
    (b.root / "same.txt").write_text("same")
    sync(a, b)
    assert sorted(tree(a.root)) == ["same.txt"] == sorted(tree(b.root))


def test_modification_beats_concurrent_deletion(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    (a.root / "keep.txt").write_text("v1")
    sync(a, b)
    (a.root / "keep.txt").unlink()
    (b.root / "keep.txt").write_text("v2 from b")
    sync(a, b)
    assert (a.root / "keep.txt").read_text() == "v2 from b" == (b.root / "keep.txt").read_text()


def test_local_edit_made_after_the_scan_is_never_clobbered(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    (a.root / "f.txt").write_text("one")
    sync(a, b)
    (a.root / "f.txt").write_text("two from a")
    a.scan()
    b.scan()
    (b.root / "f.txt").write_text("unscanned edit on b")  # after b's scan, before the sync
    from backer.protocol.session import Session
    from tests.helpers import pump

    left, right = Session(a, "a"), Session(b, "b")
    pump(left, right)
    assert (b.root / "f.txt").read_text() == "unscanned edit on b"
    assert right.replicator.reports[-1].kept_local_edits == ["f.txt"]
    sync(a, b)  # the next scan records the edit; it conflicts with a's and nothing is lost
    contents = sorted(p.read_text() for p in b.root.iterdir() if p.is_file())
    assert contents == ["two from a", "unscanned edit on b"]
    assert tree(a.root) == tree(b.root)


def test_a_long_lived_session_pushes_later_changes_both_ways(tmp_path: Path) -> None:
    from backer.protocol.session import Session
    from tests.helpers import exchange, pump

    a, b = make_devices(tmp_path, 2)
    left, right = Session(a, "a"), Session(b, "b")
    pump(left, right)
    for source, target, pusher in ((a, b, left), (b, a, right)):
        (source.root / f"later-{source.root.name}.txt").write_text("pushed")
        source.scan()
        pusher.push()
        exchange(left, right, left.take_outbox(), right.take_outbox())
        assert (target.root / f"later-{source.root.name}.txt").read_text() == "pushed"
    assert tree(a.root) == tree(b.root)


def test_empty_files_sync(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    (a.root / "empty.txt").write_bytes(b"")
    sync(a, b)
    assert (b.root / "empty.txt").read_bytes() == b""


def test_a_file_replaced_by_a_link_in_conflict_keeps_its_content_as_a_copy(tmp_path: Path) -> None:
    # found by the simulation: the copy needed chunks of the very file the link replaced
    a, b = make_devices(tmp_path, 2)
    os.symlink("f", b.root / "f")
    (a.root / "f").write_bytes(b"same")
    sync(a, b)
    sync(a, b)
    for device in (a, b):
        copies = [p for p in device.root.iterdir() if ".sync-conflict-" in p.name]
        assert len(copies) == 1 and copies[0].read_bytes() == b"same"
    assert tree(a.root) == tree(b.root)


def test_a_recorded_link_gives_way_to_a_concurrent_directory(tmp_path: Path) -> None:
    # found by the simulation: the directory won the path but the link was never replaced
    a, b = make_devices(tmp_path, 2)
    (a.root / "a").mkdir()
    os.symlink("f", a.root / "a" / "c")
    (b.root / "a" / "c").mkdir(parents=True)
    os.symlink("f", b.root / "a" / "c" / "h")
    for _ in range(3):
        sync(a, b)
    assert tree(a.root) == tree(b.root)
    assert (a.root / "a" / "c" / "h").is_symlink()


def test_a_file_made_where_a_peer_still_writes_inside_a_directory(tmp_path: Path) -> None:
    # found by the simulation: a file at d and a live d/y could never both be written
    import shutil

    a, b = make_devices(tmp_path, 2)
    (a.root / "d").mkdir()
    (a.root / "d" / "x").write_text("x")
    sync(a, b)
    shutil.rmtree(a.root / "d")
    (a.root / "d").write_text("now a file")
    (b.root / "d" / "y").write_text("written inside")
    for _ in range(3):
        sync(a, b)
    assert tree(a.root) == tree(b.root)
    assert (a.root / "d" / "y").read_text() == "written inside"
    copies = [p for p in a.root.iterdir() if p.name.startswith("d.sync-conflict-")]
    assert [c.read_text() for c in copies] == ["now a file"]


def test_a_long_run_of_large_events_is_split_under_the_frame_limit(
    tmp_path: Path, monkeypatch
) -> None:
    """A scan of 100,000 files made a run of ~11 MB that went out as one Events message
    over the 8 MiB frame limit; runs are now split by bytes as well as by count."""
    import backer.protocol.session

    monkeypatch.setattr(backer.protocol.session, "EVENT_BYTES_PER_MESSAGE", 2000)
    a, b = make_devices(tmp_path, 2)
    for n in range(60):
        (a.root / f"file-{n:03}.txt").write_text(f"contents {n}")
        a.scan()  # one event per scan: a long run of small events
    left, right = sync(a, b)
    assert tree(a.root) == tree(b.root)
    assert right.stats.events_received >= 60
    assert left.events_messages_sent > 4  # split by bytes, not sent as one message


def test_a_joiner_records_nothing_before_the_share_history_so_it_can_relay_it(
    tmp_path: Path,
) -> None:
    """A joiner that scanned its files before its first sync put its own events ahead of
    the genesis in its journal; a device joining through it was then refused ("must
    first receive the share's genesis"). Found by the replay invariant (seed 527)."""
    a, b, c = make_devices(tmp_path, 3)
    (b.root / "already-here.txt").write_text("on the joiner before it synced")
    summary = b.scan()
    assert summary.events == 0 and summary.waiting and "history" in summary.waiting
    sync(a, b)
    sync(b, c)  # c learns everything through b (b records its file now)
    sync(a, b)
    assert tree(a.root) == tree(b.root) == tree(c.root)
    assert (c.root / "already-here.txt").read_text() == "on the joiner before it synced"


def test_the_edit_made_last_wins_not_the_device_that_scanned_last(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    (a.root / "plan.txt").write_text("base")
    sync(a, b)
    (b.root / "plan.txt").write_text("edited later, on b")
    (a.root / "plan.txt").write_text("edited first, on a")
    os.utime(a.root / "plan.txt", ns=(1_700_000_000_000_000_000,) * 2)
    os.utime(b.root / "plan.txt", ns=(1_700_000_100_000_000_000,) * 2)
    b.scan()  # b records its later edit first; a's earlier edit is recorded after it
    sync(a, b)
    trees = [tree(d.root) for d in (a, b)]
    assert trees[0] == trees[1]
    assert trees[0]["plan.txt"][1] == b"edited later, on b"
    copies = [p for p in trees[0] if ".sync-conflict-" in p]
    assert len(copies) == 1 and trees[0][copies[0]][1] == b"edited first, on a"


def test_a_file_edited_while_ignored_comes_back_as_its_own_next_version(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    (a.root / "f.txt").write_text("recorded before the rule")
    sync(a, b)
    (a.root / ".backerignore").write_text("f.txt\n")
    a.scan()
    (a.root / "f.txt").write_text("edited while ignored")
    a.scan()
    (a.root / ".backerignore").unlink()
    sync(a, b)
    trees = [tree(d.root) for d in (a, b)]
    assert trees[0] == trees[1]
    assert trees[0]["f.txt"][1] == b"edited while ignored"
    assert not [p for p in trees[0] if ".sync-conflict-" in p]


def test_an_unchanged_file_unignored_after_a_remote_edit_takes_that_edit(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    (a.root / "f.txt").write_text("v1")
    sync(a, b)
    (b.root / ".backerignore").write_text("f.txt\n")
    b.scan()
    (a.root / "f.txt").write_text("v2, edited on a while b ignored it")
    sync(a, b)
    assert (b.root / "f.txt").read_text() == "v1"  # b's rules leave it alone
    (b.root / ".backerignore").unlink()
    (a.root / ".backerignore").unlink(missing_ok=True)
    sync(a, b)
    sync(a, b)
    trees = [tree(d.root) for d in (a, b)]
    assert trees[0] == trees[1]
    assert trees[0]["f.txt"][1] == b"v2, edited on a while b ignored it"
    assert not [p for p in trees[0] if ".sync-conflict-" in p]


def test_a_conflict_on_an_ignored_path_makes_no_copy_that_nobody_can_supply(
    tmp_path: Path,
) -> None:
    """Two devices wrote F concurrently; then a rule ignored F and a overwrote its own F
    (its business now). The conflict copy of a's recorded version must not become a
    file every device asks for and nobody holds (simulations, seed 117)."""
    a, b = make_devices(tmp_path, 2)
    sync(a, b)
    (a.root / "F").write_text("recorded on a")
    os.utime(a.root / "F", ns=(10**18, 10**18))  # older: a's version loses the conflict
    (b.root / "F").write_text("recorded on b")
    a.scan()
    b.scan()
    (a.root / ".backerignore").write_text("F\n")
    a.scan()
    (a.root / "F").write_text("overwritten on a while ignored")
    sync(a, b)
    sync(a, b)
    for device in (a, b):
        assert not [p for p in tree(device.root) if ".sync-conflict-" in p]
        assert not device.catalog.problems("apply")
    assert (a.root / "F").read_text() == "overwritten on a while ignored"
    assert (b.root / "F").read_text() == "recorded on b"


def test_a_file_overwritten_while_ignored_with_a_peers_bytes_supersedes_what_it_held(
    tmp_path: Path,
) -> None:
    """a held its own version of F when a rule ignored it; meanwhile b wrote F
    concurrently, and a's person overwrote F with b's very bytes. Taken for b's version
    when the rule went, a's edit never superseded a's old version: its conflict copy
    stayed live with its bytes on no disk (simulations, seed 38)."""
    a, b = make_devices(tmp_path, 2)
    sync(a, b)
    (a.root / "F").write_text("held on a, overwritten there later")
    os.utime(a.root / "F", ns=(10**18, 10**18))  # older: a's version loses the conflict
    (b.root / "F").write_text("written on b")
    a.scan()
    b.scan()
    (a.root / ".backerignore").write_text("F\n")
    a.scan()
    (a.root / "F").write_text("written on b")
    sync(a, b)
    (a.root / ".backerignore").write_text("")
    for _ in range(3):
        sync(a, b)
    for device in (a, b):
        assert not [p for p in tree(device.root) if ".sync-conflict-" in p]
        assert not device.catalog.problems("apply")
        assert (device.root / "F").read_text() == "written on b"


def test_a_path_a_received_rule_no_longer_ignores_is_written_in_the_same_sync(
    tmp_path: Path,
) -> None:
    """The plan that writes a new .backerignore was made under the old rules: the paths
    it stops ignoring were left out, and stayed missing until some later sync
    (simulations, seed 167)."""
    a, b = make_devices(tmp_path, 2)
    (a.root / ".backerignore").write_text("F\n")
    sync(a, b)
    (a.root / "F").write_text("written while ignored")
    (a.root / ".backerignore").write_text("")
    sync(a, b)
    assert (b.root / "F").read_text() == "written while ignored"


def test_a_file_deleted_while_ignored_is_deleted_once_the_rule_goes(tmp_path: Path) -> None:
    """a held the only copy of F when a rule ignored it, and its person deleted F
    meanwhile. Left standing, a's version was asked of every device with its bytes on
    no disk (simulations, seed 156); now the deletion is a's, recorded once F is synced
    again."""
    a, b = make_devices(tmp_path, 2)
    sync(a, b)
    (a.root / ".backerignore").write_text("F\n")
    (a.root / "F").write_text("only on a")
    a.scan()
    (a.root / ".backerignore").write_text("")
    a.scan()  # F recorded
    (a.root / ".backerignore").write_text("F\n")
    a.scan()  # F forgotten
    (a.root / "F").unlink()
    (a.root / ".backerignore").write_text("")
    sync(a, b)
    sync(a, b)
    assert "F" not in [p for p, _, v in a.catalog.all_live() if v.kind != v.kind.DELETED]
    for device in (a, b):
        assert not (device.root / "F").exists()
        assert not device.catalog.problems("apply")
