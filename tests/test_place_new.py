"""A file the person makes at a path while a window moves a received file there (R43):
the check that the path is still empty and the rename are one step, so the person's
file is never replaced."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from backer.fs import dirs, placeholders
from backer.fs.dirs import InShare
from backer.model.materializer import Materializer
from backer.model.share import Share
from backer.protocol.session import Session
from tests.helpers import make_devices, pump, small_disk


def _report_made_on_a(tmp_path: Path, kind: str, name: str = "report.txt") -> tuple[Share, Share]:
    """Two members, ``name`` (a file or a link, as ``kind``) recorded on a only."""
    a, b = make_devices(tmp_path, 2)
    if kind == "file":
        (a.root / name).write_text("from a")
    else:
        (a.root / name).symlink_to("elsewhere")
    a.scan()
    b.scan()
    return a, b


def _no_rename_flags(*args: object) -> int:
    """``renameat2`` where the filesystem lacks its flags (NFS, some FUSE): EINVAL."""
    ctypes.set_errno(errno.EINVAL)
    return -1


def _the_persons_file_stands(a: Share, b: Share, monkeypatch: pytest.MonkeyPatch) -> None:
    """b takes a's report.txt: the person's file saved there first stays, the received
    one gives way (kept as a local edit, no temp left), and b's next scan makes the two
    a conflict."""
    right = Session(b, "b")
    pump(Session(a, "a"), right)
    assert not (b.root / "report.txt").is_symlink()
    assert (b.root / "report.txt").read_text() == "the person's own"
    assert right.replicator.reports[-1].kept_local_edits == ["report.txt"]
    assert not [p for p in b.root.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    b.scan()
    assert len(b.catalog.live_for(["report.txt"])["report.txt"]) == 2  # a conflict


@pytest.mark.parametrize("kind", ["file", "link"])
def test_R43_a_file_made_between_the_windows_look_and_its_rename_is_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The window found the path empty and, a moment later, renamed its temp there with
    ``os.replace``: a file the person saved in between (a download, an editor's first
    save) was replaced, its bytes kept nowhere. Now it stays, reported as a local edit,
    and the next scan records it (a conflict with the received version, both kept)."""
    a, b = _report_made_on_a(tmp_path, kind)
    looked = Materializer._unchanged

    def person_saves_meanwhile(self: Materializer, target: InShare, cached: object) -> object:
        found = looked(self, target, cached)  # (the window's look: nothing there)
        if target.relative == "report.txt":
            (b.root / "report.txt").write_text("the person's own")
        return found

    monkeypatch.setattr(Materializer, "_unchanged", person_saves_meanwhile)
    right = Session(b, "b")
    pump(Session(a, "a"), right)
    assert (b.root / "report.txt").read_text() == "the person's own"
    assert right.replicator.reports[-1].kept_local_edits == ["report.txt"]
    assert not [p for p in b.root.iterdir() if p.name.endswith(".tmp")]  # (temp removed)
    monkeypatch.undo()
    b.scan()
    live = b.catalog.live_for(["report.txt"])["report.txt"]
    assert len(live) == 2  # the person's version beside a's: a conflict, nothing lost


def test_R45_a_file_saved_over_a_recorded_one_between_the_look_and_the_rename_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window found the recorded file unchanged, kept its bytes, then replaced it
    with ``os.replace``: an editor that saved the person's new text over it in between
    (a new file renamed over the old) lost it for good. Now the swap is one step and
    what comes out must be the file looked at: the person's is put back, a local edit,
    recorded by the next scan beside the received version."""
    a, b = make_devices(tmp_path, 2)
    (a.root / "notes.txt").write_text("first")
    a.scan()
    pump(Session(a, "a"), Session(b, "b"))
    (a.root / "notes.txt").write_text("a's second")
    a.scan()
    b.scan()
    looked = Materializer._unchanged

    def editor_saves_meanwhile(self: Materializer, target: InShare, cached: object) -> object:
        found = looked(self, target, cached)
        if target.relative == "notes.txt" and found is not None:
            (b.root / "saved.tmp").write_text("the person's second")
            (b.root / "saved.tmp").replace(b.root / "notes.txt")
        return found

    monkeypatch.setattr(Materializer, "_unchanged", editor_saves_meanwhile)
    right = Session(b, "b")
    pump(Session(a, "a"), right)
    assert (b.root / "notes.txt").read_text() == "the person's second"
    assert right.replicator.reports[-1].kept_local_edits == ["notes.txt"]
    assert not [p for p in b.root.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    b.scan()
    assert len(b.catalog.live_for(["notes.txt"])["notes.txt"]) == 2  # a conflict


@pytest.mark.parametrize("kind", ["file", "link"])
def test_R47_without_renameat2_a_file_saved_just_before_the_rename_is_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Where renameat2's flags are missing (EINVAL: NFS, some FUSE, older kernels),
    the window looked once more and then renamed with ``os.replace``: a file the person
    saved between that look and the rename was replaced, its bytes kept nowhere. Now a
    hard link puts the temp there, which fails if anything is there."""
    a, b = _report_made_on_a(tmp_path, kind)

    def saved_first(real: Callable[..., None]) -> Callable[..., None]:
        def call(source: str, target: str, **kw: object) -> None:
            if target == "report.txt" and not (b.root / "report.txt").exists():
                (b.root / "report.txt").write_text("the person's own")
            real(source, target, **kw)

        return call

    monkeypatch.setattr(dirs, "_renameat2", _no_rename_flags)
    for call in ("replace", "link"):  # (whichever puts the temp at the path)
        monkeypatch.setattr(os, call, saved_first(getattr(os, call)))
    _the_persons_file_stands(a, b, monkeypatch)


@pytest.mark.parametrize("kind", ["file", "link"])
def test_without_renameat2_or_hard_links_a_file_saved_before_the_rename_is_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """exFAT through FUSE has neither renameat2's flags nor hard links: the window looked
    once more and renamed with ``os.replace``, so a file the person saved between that
    look and the rename (an editor: open, truncate, write) was replaced. Now an empty
    placeholder holds the name across the rename; what the person wrote into it is put
    back and the received file gives way (a conflict, as when the file came first)."""
    a, b = _report_made_on_a(tmp_path, kind)

    def no_link(*args: object, **kw: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    real_replace = os.replace

    def saved_first(source: str, target: str, **kw: object) -> None:
        if target == "report.txt":  # the person's program: open, truncate, write
            with open(b.root / "report.txt", "w") as saved:
                saved.write("the person's own")
        real_replace(source, target, **kw)

    monkeypatch.setattr(dirs, "_renameat2", _no_rename_flags)
    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(os, "replace", saved_first)
    _the_persons_file_stands(a, b, monkeypatch)


def _written_into_the_placeholder(
    monkeypatch: pytest.MonkeyPatch,
    b: Share,
    fail: Callable[[str], None],
    name: str = "report.txt",
) -> None:
    """As above (no renameat2 flags, no hard links, the person writing into the
    placeholder before the rename); once the received file is at ``name``, each of
    the give-back's ``open`` (O_CREAT), ``pread`` and ``replace`` calls first goes
    through ``fail(call)``, which may raise."""
    armed = [False]

    def no_link(*args: object, **kw: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    real_replace, real_open, real_pread = os.replace, os.open, os.pread

    def replace(source: str, target: str, **kw: object) -> None:
        if armed[0]:
            fail("replace")
        if target == name and not armed[0]:  # the person: open, truncate, write
            with open(b.root / name, "w") as saved:
                saved.write("the person's own")
            real_replace(source, target, **kw)
            armed[0] = True
            return
        real_replace(source, target, **kw)

    def open_(path: str, flags: int, *args: object, **kw: object) -> int:
        if armed[0] and flags & os.O_CREAT:
            fail("open")
        return real_open(path, flags, *args, **kw)

    def pread(fd: int, size: int, offset: int) -> bytes:
        if armed[0]:
            fail("pread")
        return real_pread(fd, size, offset)

    monkeypatch.setattr(dirs, "_renameat2", _no_rename_flags)
    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "pread", pread)


def _failing_once(call: str, code: int) -> Callable[[str], None]:
    left = [1]

    def fail(made: str) -> None:
        if made == call and left[0]:
            left[0] -= 1
            raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize(("call", "code"), [("pread", errno.EIO), ("open", errno.ENOSPC)])
def test_a_fault_while_the_placeholders_bytes_are_copied_out_loses_none_of_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, code: int
) -> None:
    """What the person wrote into the placeholder is reached only through backer's
    descriptor once the received file took the name: the give-back moved the received
    file away first, then read those bytes and wrote them to a new file at the name, so
    a read's EIO or no room for the new file lost them (the name left empty). Now a
    read is made again, no room removes the received file (a copy peers hold) and the
    copy is tried again."""
    a, b = _report_made_on_a(tmp_path, "file")
    _written_into_the_placeholder(monkeypatch, b, _failing_once(call, code))
    right = Session(b, "b")
    pump(Session(a, "a"), right)
    monkeypatch.undo()
    assert (b.root / "report.txt").read_text() == "the person's own"
    assert right.replicator.reports[-1].kept_local_edits == ["report.txt"]
    assert sorted(p.name for p in b.root.iterdir()) == [".backer", "report.txt"]


def test_a_fault_or_kill_at_the_give_backs_rename_leaves_the_persons_bytes_beside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The give-back's first step moved the received file away from the name: a fault
    there (or a kill) left the received file at the name and the person's bytes only in
    the descriptor, lost when it closed. Now they are first copied, flushed, into a file
    of their own beside the name: where the rename onto the name fails, they stay there,
    which the next scan records as the person's new file."""
    a, b = _report_made_on_a(tmp_path, "file")
    _written_into_the_placeholder(monkeypatch, b, _failing_once("replace", errno.EIO))
    pump(Session(a, "a"), Session(b, "b"))
    monkeypatch.undo()
    assert (b.root / "report.saved.txt").read_text() == "the person's own"
    b.scan()
    assert b.catalog.live_for(["report.saved.txt"])["report.saved.txt"]


def test_R62_a_name_with_a_long_extension_gets_its_placeholders_bytes_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The give-back's copy goes beside the name as ``stem.saved.ext``, cut to fit
    NAME_MAX by its stem alone: where the extension (all after the last dot) took 250
    bytes or more, every such name was longer than NAME_MAX, each try failed with
    ENAMETOOLONG, and what the person had written into the placeholder was lost when
    its descriptor closed. An extension that long is now part of the stem, as in a
    conflict copy's name."""
    name = ("Re. minutes of the meeting about the move" + " and the move" * 20)[:255]
    assert len(name[name.rfind(".") :]) == 253  # (all but "Re")
    a, b = _report_made_on_a(tmp_path, "file", name)
    _written_into_the_placeholder(monkeypatch, b, lambda call: None, name)
    right = Session(b, "b")
    pump(Session(a, "a"), right)
    monkeypatch.undo()
    assert (b.root / name).read_text() == "the person's own"
    assert right.replicator.reports[-1].kept_local_edits == [name]
    assert sorted(p.name for p in b.root.iterdir()) == [".backer", name]


@pytest.mark.parametrize("written", ["", "the person's own"])
def test_a_placeholder_a_kill_left_is_removed_at_the_next_scan_not_recorded(
    tmp_path: Path, written: str
) -> None:
    """A process killed between the placeholder's creation and the rename left the
    empty file at the name, and the next scan recorded it as the person's new file (a
    conflict with the received version on every device). The note written before the
    placeholder has the scan remove it; a file the person wrote into stays theirs."""
    a, b = _report_made_on_a(tmp_path, "file")
    killed = placeholders.noted(b.root, "report.txt")
    killed.__enter__()  # (the process dies inside: the note is never removed)
    (b.root / "report.txt").write_text(written)  # the placeholder
    b.scan()
    assert not list((b.root / ".backer" / placeholders.NOTES).iterdir())
    if written:
        assert (b.root / "report.txt").read_text() == written
        return
    assert not (b.root / "report.txt").exists()
    assert not b.catalog.live_for(["report.txt"]).get("report.txt")
    pump(Session(a, "a"), Session(b, "b"))
    assert (b.root / "report.txt").read_text() == "from a"
    assert len(b.catalog.live_for(["report.txt"])["report.txt"]) == 1


def test_R63_a_placeholders_note_does_not_reach_onto_a_disk_mounted_since(
    tmp_path: Path,
) -> None:
    """A note left by a kill names a path where backer was making a placeholder; the
    next scan removed an empty file it found there, reached through whatever folders
    stood on the way by then: a disk mounted at one of them since (a USB stick at
    ``usb``, put in while backer was down) lost its own empty file there (a marker, a
    ``.nomedia``), a removal on another filesystem. The note's folders must now be the
    share's own."""
    _, b = make_devices(tmp_path, 2)
    killed = placeholders.noted(b.root, "usb/.nomedia")
    killed.__enter__()  # (the process dies inside: the note is never removed)
    with small_disk(b.root / "usb", "1m") as stick:
        (stick / ".nomedia").touch()
        b.scan()
        assert (stick / ".nomedia").exists(), "the stick's file was removed"
    assert not list((b.root / ".backer" / placeholders.NOTES).iterdir())


def test_R64_an_empty_file_the_person_made_after_a_kill_at_a_noted_path_stays(
    tmp_path: Path,
) -> None:
    """The next scan after a kill removed any empty, unrecorded file at a path a note
    named: a person who, while backer was down, deleted the empty file they found there
    and saved an empty file of their own (an ``__init__.py``, a ``.gitkeep``) lost it, and
    the received file took its name. A placeholder is made right after its note; a file
    made at that path long after the note is the person's and stays, to be recorded as
    their new file (beside the received version: a conflict, both kept)."""
    a, b = _report_made_on_a(tmp_path, "file")
    killed = placeholders.noted(b.root, "report.txt")
    killed.__enter__()  # (the process dies inside: the note is never removed)
    (note,) = (b.root / ".backer" / placeholders.NOTES).iterdir()
    an_hour_ago = note.stat().st_mtime - 3600
    os.utime(note, (an_hour_ago, an_hour_ago))  # (the kill was an hour ago)
    (b.root / "report.txt").touch()  # the person's own empty file
    b.scan()
    assert (b.root / "report.txt").exists(), "the person's empty file was removed"
    assert not list((b.root / ".backer" / placeholders.NOTES).iterdir())
    right = Session(b, "b")
    pump(Session(a, "a"), right)
    assert (b.root / "report.txt").read_bytes() == b""
    assert right.replicator.reports[-1].kept_local_edits == ["report.txt"]
    b.scan()
    assert len(b.catalog.live_for(["report.txt"])["report.txt"]) == 2  # a conflict



def test_R67_a_noted_placeholder_that_cannot_be_removed_does_not_stop_every_scan(
    tmp_path: Path,
) -> None:
    """A note left by a kill names an empty file that cannot be removed (its folder made
    read-only since, the file immutable, a bind on it): the removal's error ended the
    scan before anything was recorded, and the note stayed, so every scan after it
    failed the same way ('backer: error: report.txt: Operation not permitted'): nothing
    of the share was recorded or sent until the person found the note. The file is now
    left (the scan records it, as a file of the person's) and the note dropped."""
    a, _ = make_devices(tmp_path, 2)
    killed = placeholders.noted(a.root, "report.txt")
    killed.__enter__()  # (the process dies inside: the note is never removed)
    (a.root / "report.txt").touch()  # the placeholder
    if subprocess.run(["chattr", "+i", str(a.root / "report.txt")]).returncode != 0:
        pytest.skip("chattr +i is not supported here (or not root)")
    try:
        (a.root / "new.txt").write_text("a file of the person's")
        a.scan()
    finally:
        subprocess.run(["chattr", "-i", str(a.root / "report.txt")], check=True)
    assert a.catalog.live_for(["new.txt"]).get("new.txt")
    assert not list((a.root / ".backer" / placeholders.NOTES).iterdir())
    a.scan()
