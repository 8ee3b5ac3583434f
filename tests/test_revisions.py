"""The revisions engine (backer/model/revisions.py) on real shares and in-memory sessions:
conflicts and their resolution, a folder as it was, restore plans, bytes fetched from
a peer."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from backer.errors import BackerError
from backer.model import revisions
from backer.model.records import Kind, Version
from backer.model.share import Share
from backer.node import commands
from backer.protocol.session import Session
from backer.scanner.chunks import ChunkStore
from tests.helpers import make_devices, pump, sync


def _moment(share: Share) -> int:
    """A time after everything recorded so far, before anything recorded next."""
    latest = max(v.time_ms for _, _, v in share.catalog.versions_under(""))
    time.sleep(0.01)
    return latest


def _conflicted(tmp_path: Path) -> tuple[Share, Share]:
    a, b = make_devices(tmp_path, 2)
    (a.root / "notes.txt").write_text("first\n")
    sync(a, b)
    (a.root / "notes.txt").write_text("a's edit\n")
    (b.root / "notes.txt").write_text("b's longer edit\n")
    sync(a, b)
    sync(a, b)
    return a, b


def test_conflicts_lists_each_copy_under_the_path_its_version_was_written_at(
    tmp_path: Path,
) -> None:
    a, b = _conflicted(tmp_path)
    for share in (a, b):
        (conflict,) = revisions.conflicts(share.catalog)
        assert conflict.path == "notes.txt"
        held, copied = conflict.contenders
        assert held.copy_path is None and copied.copy_path is not None
        assert (share.root / copied.copy_path).read_bytes() in (b"a's edit\n", b"b's longer edit\n")
        assert share.catalog.conflicted_paths() == []  # (the old count said 0 here)
        assert commands.status_report(share)["conflicts"] == 1


def test_resolving_with_a_losing_version_writes_it_at_the_path_and_removes_the_copy(
    tmp_path: Path,
) -> None:
    a, b = _conflicted(tmp_path)
    (conflict,) = revisions.conflicts(a.catalog)
    loser = conflict.contenders[1]
    said = revisions.resolve_conflict(a, "notes.txt", keep=loser.version_id[-6:])
    assert said == f"resolved notes.txt: kept version {loser.version_id}, 1 copies removed"
    text = (a.root / "notes.txt").read_bytes()
    assert not (a.root / str(loser.copy_path)).exists()
    sync(a, b)
    for share in (a, b):
        assert revisions.conflicts(share.catalog) == []
        assert (share.root / "notes.txt").read_bytes() == text
        assert sorted(os.listdir(share.root)) == [".backer", "notes.txt"]
        assert loser.version_id in {e.version_id for e in share.catalog.history("notes.txt")}


def test_keep_both_makes_each_copy_an_ordinary_file_without_rewriting_it(tmp_path: Path) -> None:
    a, b = _conflicted(tmp_path)
    (conflict,) = revisions.conflicts(a.catalog)
    copy = a.root / str(conflict.contenders[1].copy_path)
    inode = copy.stat().st_ino
    revisions.resolve_conflict(a, "notes.txt", keep_both=True)
    assert copy.stat().st_ino == inode  # taken over as it is
    sync(a, b)
    assert revisions.conflicts(a.catalog) == revisions.conflicts(b.catalog) == []
    assert (b.root / copy.name).read_bytes() == copy.read_bytes()


def test_keep_newest_and_bad_choices(tmp_path: Path) -> None:
    a, _ = _conflicted(tmp_path)
    (conflict,) = revisions.conflicts(a.catalog)
    with pytest.raises(BackerError, match="is not one of the versions of"):
        revisions.resolve_conflict(a, "notes.txt", keep="nothing")
    first, second = (c.version_id for c in conflict.contenders)
    shared = first[: next(i for i, (x, y) in enumerate(zip(first, second, strict=True)) if x != y)]
    assert shared  # (the first digit is the top of the second: the same for decades)
    with pytest.raises(BackerError, match="is not one of the versions of"):
        revisions.resolve_conflict(a, "notes.txt", keep=shared)  # names both
    with pytest.raises(BackerError, match="no conflict at 'other"):
        revisions.resolve_conflict(a, "other.txt")
    newest = max(conflict.contenders, key=lambda c: c.version.mtime_ns)
    revisions.resolve_conflict(a, str(conflict.contenders[1].copy_path))  # by its copy
    assert a.catalog.live_versions("notes.txt")[
        next(iter(a.catalog.live_versions("notes.txt")))
    ].same_content(newest.version)


def test_a_folder_as_it_was_and_its_restore_deleting_what_was_made_since(share: Share) -> None:
    (share.root / "album").mkdir()
    for name in ("one.jpg", "two.jpg"):
        (share.root / "album" / name).write_bytes(os.urandom(5000))
    share.scan()
    moment = _moment(share)
    (share.root / "album" / "two.jpg").write_bytes(b"edited")
    (share.root / "album" / "three.jpg").write_bytes(b"made since")
    (share.root / "album" / "one.jpg").unlink()
    share.scan()
    listed = revisions.listing(share.catalog, "album", moment)
    assert [e.path for e in listed] == ["album/one.jpg", "album/two.jpg"]
    assert revisions.listing(share.catalog, "", moment)[0].version.kind == Kind.DIRECTORY
    with pytest.raises(BackerError, match="did not exist"):
        revisions.plan_restore(share, "album/three.jpg", at_ms=moment)
    plan = revisions.plan_restore(share, "album", at_ms=moment)
    assert [(p, v.kind) for p, v in plan.writes] == [
        ("album/one.jpg", Kind.FILE),
        ("album/two.jpg", Kind.FILE),
        ("album/three.jpg", Kind.DELETED),
    ]


def test_restore_records_new_versions_so_it_can_be_undone(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    (a.root / "album").mkdir()
    (a.root / "album" / "one.jpg").write_bytes(os.urandom(5000))
    sync(a, b)
    moment = _moment(a)
    (a.root / "album" / "one.jpg").unlink()
    (a.root / "album" / "new.jpg").write_bytes(b"new")
    sync(a, b)  # b keeps one.jpg's bytes as it deletes it
    plan = revisions.plan_restore(b, "album", at_ms=moment)
    before_restore = _moment(b)
    said = revisions.carry_out(b, plan, ChunkStore(b.root, b.catalog), None)
    assert said.endswith("(1 written, 1 deleted)")
    assert sorted(os.listdir(b.root / "album")) == ["one.jpg"]
    sync(a, b)
    assert sorted(os.listdir(a.root / "album")) == ["one.jpg"]
    undo = revisions.plan_restore(b, "album", at_ms=before_restore)
    assert {p for p, _ in undo.writes} == {"album/one.jpg", "album/new.jpg"}


def test_a_version_restored_elsewhere_in_the_share_or_outside_it(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    (a.root / "doc.txt").write_text("one\n")
    sync(a, b)
    first = b.catalog.history("doc.txt")[0].version_id
    (a.root / "doc.txt").write_text("two\n")
    sync(a, b)
    store = ChunkStore(b.root, b.catalog)
    inside = revisions.plan_restore(b, "doc.txt", version_id=first, dest="old/doc.txt")
    revisions.carry_out(b, inside, store, None)
    assert (b.root / "old" / "doc.txt").read_text() == "one\n"
    outside = tmp_path / "exported"
    outside.mkdir()
    plan = revisions.plan_restore(b, "doc.txt", version_id=first)
    said = revisions.carry_out(b, plan, store, outside)
    assert said.startswith("wrote 1 entries") and (outside / "doc.txt").read_text() == "one\n"
    with pytest.raises(BackerError, match="already exists; nothing there is replaced"):
        revisions.carry_out(b, plan, store, outside)
    assert [p.name for p in outside.iterdir()] == ["doc.txt"]  # no temp file left


def test_a_members_link_with_entries_below_it_is_never_followed_by_a_restore_elsewhere(
    tmp_path: Path,
) -> None:
    """A hostile member's event makes ``evil`` a link to a folder outside while
    ``evil/planted.txt`` stays live: restored outside the share, neither the link nor
    what is below it may put a file in that folder."""
    (share,) = make_devices(tmp_path, 1)
    victim = tmp_path / "victim"
    victim.mkdir()
    (share.root / "evil").mkdir()
    (share.root / "evil" / "planted.txt").write_text("planted\n")
    os.symlink(victim, share.root / "lnk")
    share.scan()
    link = next(iter(share.catalog.live_for(["lnk"])["lnk"].values()))
    (folder,) = share.catalog.live_for(["evil"])["evil"]
    share.commit([("evil", dataclasses.replace(link, supersedes=(folder,)))])
    moment = _moment(share)
    assert "evil/planted.txt" not in revisions.state_at(share.catalog, "", moment)
    store = ChunkStore(share.root, share.catalog)
    for top, dest in (("evil", tmp_path / "out" / "x"), ("", tmp_path / "whole")):
        plan = revisions.plan_restore(share, top, at_ms=moment)
        revisions.carry_out(share, plan, store, dest)
    assert list(victim.iterdir()) == []
    assert (tmp_path / "whole" / "lnk").is_symlink()  # a new folder made, as mkdir -p


def test_a_whole_share_restored_into_an_existing_folder_goes_into_a_folder_of_its_name(
    tmp_path: Path,
) -> None:
    (share,) = make_devices(tmp_path, 1)
    (share.root / "a").mkdir()
    (share.root / "a" / "b.txt").write_text("b\n")
    share.scan()
    moment = _moment(share)
    (tmp_path / "into").mkdir()
    store = ChunkStore(share.root, share.catalog)
    revisions.carry_out(
        share, revisions.plan_restore(share, "", at_ms=moment), store, tmp_path / "into"
    )
    assert (tmp_path / "into" / share.root.name / "a" / "b.txt").read_text() == "b\n"


def test_bytes_only_a_peer_holds_are_fetched_through_the_replicator(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    sync(a, b)  # b has joined: its scans record from now on
    original = os.urandom(20_000)
    (b.root / "doc.txt").write_bytes(original)
    sync(a, b)
    old = b.catalog.history("doc.txt")[0]
    (b.root / "doc.txt").write_bytes(b"replaced")
    sync(a, b)  # a keeps the old bytes; b, which replaced them, does not
    shutil.rmtree(b.root / ".backer" / "versions", ignore_errors=True)
    plan = revisions.plan_restore(b, "doc.txt", version_id=old.version_id)
    missing = revisions.missing_chunks(b.catalog, ChunkStore(b.root, b.catalog), [old.version])
    assert sum(missing.values()) == 20_000
    fetched = revisions.Fetched(b, {**missing, b"\x01" * 32: 100})  # and one nobody has
    left, right = Session(a, "a"), Session(b, "b")
    right.replicator.retrieve(fetched)
    pump(left, right)
    assert fetched.wanted == {} and fetched.lacking == {b"\x01" * 32}
    assert right.stats.chunk_bytes_received == 20_000
    with pytest.raises(BackerError, match="are on no reachable device"):
        commands.finish_restore(b, plan, None, fetched)
    fetched = revisions.Fetched(b, missing)
    left, right = Session(a, "a"), Session(b, "b")
    right.replicator.retrieve(fetched)
    pump(left, right)
    commands.finish_restore(b, plan, None, fetched)
    assert (b.root / "doc.txt").read_bytes() == original
    assert not fetched.path.exists()


def test_a_destination_through_a_link_is_refused_before_anything_is_recorded(
    share: Share, tmp_path: Path
) -> None:
    (share.root / "doc.txt").write_text("one\n")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, share.root / "out")  # a link in the share, to a folder outside
    os.symlink(share.root, tmp_path / "back")  # a link outside, into the share
    share.scan()
    events = share.journal.count()
    for dest, said in (
        (share.root / "out" / "doc.txt", "is not a directory (links are not followed)"),
        (tmp_path / "back" / "doc.txt", "leads into the share through a link"),
    ):
        with pytest.raises(BackerError, match=re.escape(said)):
            commands.restore_plan(share, {"path": "doc.txt", "at": _moment(share), "to": str(dest)})
    assert share.journal.count() == events and os.listdir(outside) == []


def _make(root: Path, kind: str, who: str) -> None:
    """``root/x`` made of ``kind`` (it was a file) by ``who``."""
    path = root / "x"
    path.unlink()
    if kind == "file":
        path.write_text(f"{who}'s file\n")
    elif kind == "folder":
        path.mkdir()
        (path / "inside.txt").write_text(f"{who}'s entry\n")
    else:
        os.symlink(f"/nowhere/{who}", path)


def _kind_of(path: Path) -> str:
    return "link" if path.is_symlink() else "folder" if path.is_dir() else "file"


KINDS = ("file", "folder", "link")


@pytest.mark.parametrize(
    ("a_kind", "b_kind"),
    [(a, b) for a in KINDS for b in KINDS if a != b],  # (two folders merge)
)
def test_R8_keeping_one_of_two_kinds_holds_the_path_with_it_or_is_refused(
    tmp_path: Path, a_kind: str, b_kind: str
) -> None:
    for keep in (0, 1):
        (tmp_path / str(keep)).mkdir()
        a, b = make_devices(tmp_path / str(keep), 2)
        (a.root / "x").write_text("base\n")
        sync(a, b)
        _make(a.root, a_kind, "a")
        _make(b.root, b_kind, "b")
        sync(a, b)
        sync(a, b)
        (conflict,) = revisions.conflicts(a.catalog)
        chosen = conflict.contenders[keep]
        kind = {Kind.FILE: "file", Kind.DIRECTORY: "folder", Kind.SYMLINK: "link"}
        before = {share.root: sorted(os.listdir(share.root)) for share in (a, b)}
        try:
            said = revisions.resolve_conflict(a, "x", keep=chosen.version_id)
        except BackerError as refused:
            assert "folder" in str(refused) and "x" in str(refused)
            assert revisions.conflicts(a.catalog) != []  # nothing was done
            assert sorted(os.listdir(a.root)) == before[a.root]
            continue
        assert said.startswith(f"resolved x: kept version {chosen.version_id}")
        sync(a, b)
        for share in (a, b):
            assert revisions.conflicts(share.catalog) == [], (keep, share.root)
            assert sorted(os.listdir(share.root)) == [".backer", "x"], (keep, share.root)
            assert _kind_of(share.root / "x") == kind[chosen.version.kind], (keep, share.root)


def test_resolving_a_copys_own_conflict_resolves_that_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conflict copy had a conflict of its own (a copy of the copy) while the conflict
    it is a copy of stood too. Resolving the copy's path resolved the conflict of which
    it is a copy instead (the first match), so the copy of the copy stayed everywhere
    (simulation seed 2; the two conflicts are given here as the catalog lists them)."""
    (share,) = make_devices(tmp_path, 1)
    version = Version(Kind.FILE, 1, content=bytes(32), device=b"d" * 8, time_ms=1)
    copy = "f.sync-conflict-20260101-000000-AAAAAAA"
    of_f = revisions.Conflict("f", [
        revisions.Contender("A" * 12, version, None),
        revisions.Contender("B" * 12, version, copy),
    ])  # fmt: skip
    of_copy = revisions.Conflict(copy, [
        revisions.Contender("B" * 12, version, None),
        revisions.Contender("C" * 12, version, copy + ".sync-conflict-20260101-000000-BBBBBBB"),
    ])  # fmt: skip
    monkeypatch.setattr(revisions, "conflicts", lambda catalog: [of_f, of_copy])
    assert revisions.find_conflict(share.catalog, copy) is of_copy
    assert revisions.find_conflict(share.catalog, "f") is of_f
