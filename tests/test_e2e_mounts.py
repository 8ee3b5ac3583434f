"""A filesystem mounted inside a share (a USB disk, a bind, a tmpfs): real CLI processes,
a real mount."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from backer.fs import dirs
from backer.fs.mounts import ShareDisk
from backer.protocol.session import Session
from backer.scanner import walk
from tests.e2e import Device, joined_pair
from tests.helpers import make_devices, pump, small_disk


def _files(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if ".backer" not in p.parts
    )


def test_R57_a_disk_unmounted_from_inside_the_share_deletes_nothing_on_the_peers(
    tmp_path: Path,
) -> None:
    """The walk followed a mount point inside the share: its files were recorded, and
    once the disk was unmounted the folder was empty, so the next scan recorded every
    one of them as deleted and each peer deleted them too (a USB disk mounted at
    ~/Backer/usb, unplugged). A mount point is now not followed: reported on one line,
    nothing below it recorded, and unmounting it deletes nothing anywhere.

    A window still wrote a peer's files below it, onto the mounted disk, and recorded
    them there: unmounted, they were deleted on every device, b's usb/own.txt from its
    own disk (R57). A path below a mount point is now not written: reported, left live,
    and written once the folder is the share's own again."""
    a, b, (port, _) = joined_pair(tmp_path)
    (a.root / "notes.txt").write_text("on the share's own disk\n")
    with small_disk(a.root / "usb", "4m"):
        mode = (a.root / "usb").stat().st_mode  # (the disk's root's)
        (a.root / "usb" / "photo.jpg").write_bytes(b"\xff\xd8 a photo")
        scanned = a.run("scan", "--dir", str(a.root))
        with a.serving(port) as address:
            b.sync(address)
        before = _files(b.root)
        (b.root / "usb").mkdir(exist_ok=True)
        (b.root / "usb" / "own.txt").write_text("b's file in its own usb folder\n")
        b.run("scan", "--dir", str(b.root))
        with b.serving() as address:
            synced = a.run("sync", address, "--dir", str(a.root), check=False)
        on_the_disk = sorted(p.name for p in (a.root / "usb").iterdir())
        assert (a.root / "usb").stat().st_mode == mode, "b's folder's mode went to a's disk"
    a.run("scan", "--dir", str(a.root))
    with a.serving(port) as address:
        b.sync(address)
    assert set(before) <= set(_files(b.root)), "unmounting a's disk deleted files on b"
    assert before == ["notes.txt"]  # nothing below the mount point was recorded
    assert scanned.stderr.count("\n") == 1, scanned.stderr  # one line
    assert "usb: skipped: another filesystem is mounted here" in scanned.stderr
    assert _files(b.root) == ["notes.txt", "usb", "usb/own.txt"]
    assert on_the_disk == ["photo.jpg"], "b's file was written onto a's disk"
    assert "not written: another filesystem is mounted at usb: 2 files" in synced.stderr
    assert "    usb/own.txt\n" in synced.stderr, synced.stderr
    assert (a.root / "usb" / "own.txt").read_text() == "b's file in its own usb folder\n"
    assert "photo.jpg" not in a.run("log", "--dir", str(a.root)).stdout


def test_R61_a_folder_bound_from_the_same_disk_and_unbound_deletes_nothing(
    tmp_path: Path,
) -> None:
    """A mount point was told by its device number alone, and a bind of a folder of the
    same filesystem (``mount --bind ~/Photos ~/Backer/photos``, the way to sync a folder
    that lives elsewhere) has the share's: the walk followed it, and once it was
    unbound (a reboot, without an fstab line) the next scan recorded every file that
    had been below it as deleted, for every device to delete. Mount points are now also
    read from the mount table: reported on one line, nothing below recorded."""
    if os.geteuid() != 0:
        pytest.skip("a bind mount needs root")
    a = Device(tmp_path, "a")
    (a.root / "photos").mkdir(parents=True)
    (a.root / "notes.txt").write_text("on the share's own disk\n")
    (tmp_path / "Photos").mkdir()
    (tmp_path / "Photos" / "photo.jpg").write_bytes(b"\xff\xd8 a photo")
    bind = ["mount", "--bind", str(tmp_path / "Photos"), str(a.root / "photos")]
    subprocess.run(bind, check=True)
    try:
        scanned = a.run("init", str(a.root))
    finally:
        subprocess.run(["umount", "-l", str(a.root / "photos")], check=True)
    a.run("scan", "--dir", str(a.root))
    log = a.run("log", "--dir", str(a.root)).stdout
    assert "photo.jpg" not in log, log
    assert "photos: skipped: another filesystem is mounted here" in scanned.stderr, scanned.stderr


def test_R66_a_bind_made_while_a_scan_walks_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mount table is read as a scan starts, and a whole scan walks for minutes on a
    large share: a bind of a folder of the same filesystem made meanwhile (at start-up,
    a mount unit after the node's) was followed, its files recorded, and once it was
    unbound the next scan recorded them deleted, for every device to delete (R61 by a
    race). The walk now also asks the kernel whether each folder is a mount's root."""
    if os.geteuid() != 0:
        pytest.skip("a bind mount needs root")
    a, _ = make_devices(tmp_path, 2)
    (a.root / "photos").mkdir()
    a.scan()
    (tmp_path / "Photos").mkdir()
    (tmp_path / "Photos" / "photo.jpg").write_bytes(b"\xff\xd8 a photo")
    read_as_the_scan_starts = walk.share_disk

    bound: list[Path] = []

    def bound_meanwhile(root: Path) -> ShareDisk:
        disk = read_as_the_scan_starts(root)
        if not bound:  # (os.path.ismount cannot tell a bind of the same filesystem)
            _bind(tmp_path / "Photos", root / "photos", bound)
        return disk

    monkeypatch.setattr(walk, "share_disk", bound_meanwhile)
    try:
        scanned = a.scan()
    finally:
        _unbind(bound)
    monkeypatch.undo()
    a.scan()
    assert "photos/photo.jpg" not in scanned.added
    assert [p.path for p in scanned.errors] == ["photos"]  # (skipped: mounted)
    assert not a.catalog.live_for(["photos/photo.jpg"]).get("photos/photo.jpg")


def test_R66_a_window_writes_nothing_into_a_bind_made_after_it_read_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window reads the mount table once too: a bind made after that, at a folder
    it then wrote into, took the peer's file into the bound folder, outside the share.
    Each folder the window opens is now asked of the kernel through its descriptor."""
    if os.geteuid() != 0:
        pytest.skip("a bind mount needs root")
    a, b = make_devices(tmp_path, 2)
    (a.root / "photos").mkdir()
    (a.root / "photos" / "from_a.jpg").write_bytes(b"\xff\xd8 a's photo")
    a.scan()
    (b.root / "photos").mkdir()
    (tmp_path / "Photos").mkdir()
    read_before = dirs.share_disk(b.root)  # (what any read of the window saw)
    bound: list[Path] = []

    def bound_meanwhile(root: Path) -> ShareDisk:
        if not bound:  # (os.path.ismount cannot tell a bind of the same filesystem)
            bind = ["mount", "--bind", str(tmp_path / "Photos"), str(b.root / "photos")]
            subprocess.run(bind, check=True)
            bound.append(b.root / "photos")
        return read_before

    monkeypatch.setattr(dirs, "share_disk", bound_meanwhile)
    try:
        pump(Session(a, "a"), Session(b, "b"))
    finally:
        for point in bound:
            subprocess.run(["umount", "-l", str(point)], check=True)
    assert bound, "the window read no mount table"
    assert list((tmp_path / "Photos").iterdir()) == [], "written outside the share"


def _bind(source: Path, target: Path, bound: list[Path]) -> None:
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    bound.append(target)


def _unbind(bound: list[Path]) -> None:
    for point in reversed(bound):
        subprocess.run(["umount", "-l", str(point)], check=True)
    bound.clear()


def test_R69_a_file_bound_into_the_share_is_not_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only folders were checked for a mount: a file bound onto a share's file (``mount
    --bind /etc/hostname share/hostname``) was read, its bytes recorded and sent to
    every device, and once unbound the share's own file came back as a change. A file
    that is a mount point is now skipped as a mounted folder is, and stays as recorded:
    whether the table names it (bound before the scan) or only the kernel does (bound
    while the scan walks, after its read of the table)."""
    if os.geteuid() != 0:
        pytest.skip("a bind mount needs root")
    a, _ = make_devices(tmp_path, 2)
    (a.root / "hostname").write_bytes(b"the share's own\n")
    (a.root / "late").write_bytes(b"the share's own too\n")
    a.scan()
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "hostname").write_bytes(b"outside the share\n")
    read_as_the_scan_starts = walk.share_disk
    bound: list[Path] = []

    def bound_meanwhile(root: Path) -> ShareDisk:
        disk = read_as_the_scan_starts(root)
        if len(bound) == 1:
            _bind(tmp_path / "etc" / "hostname", root / "late", bound)
        return disk

    monkeypatch.setattr(walk, "share_disk", bound_meanwhile)
    try:
        _bind(tmp_path / "etc" / "hostname", a.root / "hostname", bound)
        scanned = a.scan()
    finally:
        _unbind(bound)
    monkeypatch.undo()
    after = a.scan()
    assert sorted(p.path for p in scanned.errors) == ["hostname", "late"], scanned.errors
    assert all("a file is mounted here" in p.reason for p in scanned.errors)
    assert not scanned.modified and not after.modified and not after.added
    for path, own in (("hostname", b"the share's own\n"), ("late", b"the share's own too\n")):
        (version,) = a.catalog.live_for([path])[path].values()
        assert version.size == len(own), f"{path}: the bound file's bytes were recorded"


def test_R69_a_window_neither_replaces_nor_deletes_a_bound_file(tmp_path: Path) -> None:
    """A file a window was to replace or delete is checked as its folders are: a file
    bound onto (here onto itself, so that it is exactly as recorded) is reported as
    mounted, its bytes and the mount left alone, the peer's version live to be written
    once it is unbound; before, the rename over it failed with EBUSY, after a copy of
    what was bound into the store."""
    if os.geteuid() != 0:
        pytest.skip("a bind mount needs root")
    a, b = make_devices(tmp_path, 2)
    (a.root / "x").write_bytes(b"x as both had it\n")
    (a.root / "y").write_bytes(b"y as both had it\n")
    a.scan()
    pump(Session(a, "a"), Session(b, "b"))
    (a.root / "x").write_bytes(b"x as a changed it\n")
    (a.root / "y").unlink()
    a.scan()
    bound: list[Path] = []
    try:
        _bind(b.root / "x", b.root / "x", bound)
        _bind(b.root / "y", b.root / "y", bound)
        pump(Session(a, "a"), Session(b, "b"))
        problems = {p.path: p.reason for _, p, _ in b.catalog.problems("apply")}
        assert (b.root / "x").read_bytes() == b"x as both had it\n"
        assert (b.root / "y").exists()
    finally:
        _unbind(bound)
    assert problems == {
        "x": "not written: another filesystem is mounted at x",
        "y": "not written: another filesystem is mounted at y",
    }, problems
    pump(Session(a, "a"), Session(b, "b"))
    assert (b.root / "x").read_bytes() == b"x as a changed it\n"
    assert not (b.root / "y").exists()


def test_R66_a_partial_scan_reads_nothing_below_a_bind_made_after_its_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partial scan (the paths a watcher's batch or a peer's stale read names) reads
    the mount table as it starts, then each path: a bind made meanwhile at a folder
    above one of them (two levels up, here) was not looked for (only the path itself
    was asked of the kernel), so the bound folder's file and its folder were read and
    recorded as the share's, the file's bytes sent to every device, and once unbound
    the share's own came back as a change. Each folder above such a path is asked too."""
    if os.geteuid() != 0:
        pytest.skip("a bind mount needs root")
    a, _ = make_devices(tmp_path, 2)
    (a.root / "photos" / "2024").mkdir(parents=True)
    own = b"\xff\xd8 the share's own photo"
    (a.root / "photos" / "2024" / "photo.jpg").write_bytes(own)
    a.scan()
    (tmp_path / "Photos" / "2024").mkdir(parents=True)
    (tmp_path / "Photos" / "2024" / "photo.jpg").write_bytes(b"\xff\xd8 a photo from outside")
    read_as_the_scan_starts = walk.share_disk
    bound: list[Path] = []
    tables: list[ShareDisk] = []

    def bound_meanwhile(root: Path) -> ShareDisk:
        tables.append(read_as_the_scan_starts(root))
        if not bound:
            _bind(tmp_path / "Photos", root / "photos", bound)
        return tables[-1]

    monkeypatch.setattr(walk, "share_disk", bound_meanwhile)
    try:
        scanned = a.scan(paths=["photos/2024/photo.jpg"])
    finally:
        _unbind(bound)
    monkeypatch.undo()
    after = a.scan()
    assert tables, "the scan read no mount table"
    assert not scanned.modified, "the bound folder's file was recorded"
    assert not after.modified and not after.added
    path = "photos/2024/photo.jpg"
    (version,) = a.catalog.live_for([path])[path].values()
    assert version.size == len(own), "the bound file's bytes were recorded"
