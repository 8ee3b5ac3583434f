"""A share on exFAT (a USB stick, an SD card): no hard links and no ``renameat2``
exchange. Real CLI processes on a real exFAT mount (FUSE, from an image file)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from simulations.faults import Disks
from tests.e2e import Device, snapshot
from tests.helpers import exfat_disk


def _history_ids(device: Device, path: str) -> list[str]:
    lines = device.run("history", path, cwd=device.root).stdout.splitlines()
    return [line.split()[3] for line in lines]


def test_on_exfat_an_edited_file_and_a_peer_replaced_one_can_be_restored(tmp_path: Path) -> None:
    """Every entry of the content store was a hard link, and a link that cannot be made
    cost the version: on exFAT, 'history' showed the replaced version as pruned on every
    device and no restore brought it back. Now the store keeps copies there: the
    person's own edit in place and a peer's edit applied by 'sync' are both restored
    from this device alone, and a version written outside the share on the stick
    (it was put in place by a hard link: 'Operation not permitted')."""
    with exfat_disk(tmp_path / "stick") as stick:
        a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
        a.root = stick / "a"
        a.root.mkdir()
        (a.root / "mine.txt").write_text("my first draft\n")
        (a.root / "shared.txt").write_text("shared, as first written\n")
        a.run("init", str(a.root))
        with a.serving():
            token = a.run("invite", "--no-wait", "--dir", str(a.root)).stdout.strip()
            b.run("join", token, str(b.root))
        with open(a.root / "mine.txt", "r+") as file:  # rewritten in place, as 'echo >' does
            file.write("MY SECOND DRAFT\n")
        a.run("scan", "--dir", str(a.root))
        (b.root / "shared.txt").write_text("shared, as the peer rewrote it\n")
        with b.serving() as address:
            a.sync(address)
        assert (a.root / "shared.txt").read_text() == "shared, as the peer rewrote it\n"
        firsts = {"mine.txt": "my first draft\n", "shared.txt": "shared, as first written\n"}
        for path, old in firsts.items():
            a.run("restore", path, "--version", _history_ids(a, path)[0], cwd=a.root)
            assert (a.root / path).read_text() == old, path
        outside = stick / "restored.txt"  # a restore --to a place outside the share
        a.run("restore", "mine.txt", "--version", _history_ids(a, "mine.txt")[1], "--to",
              str(outside), cwd=a.root)  # fmt: skip
        assert outside.read_text() == "MY SECOND DRAFT\n"
        assert not list(stick.rglob("*.tmp"))


def test_folders_twinned_by_case_leave_the_case_sensitive_peer_as_it_was(tmp_path: Path) -> None:
    """exFAT ignores case: a received 'Dir/x' went into the folder 'DIR' already there and
    was recorded at 'Dir/x', so the stick's next scan found 'Dir' and 'Dir/x' gone (and
    'DIR/x' new) and the peer, whose disk keeps both folders, deleted its 'Dir' with
    'Dir/x' in it. Now what the stick holds under another spelling is not written there,
    and the join says so on one line; every file of the peer stays where it was."""
    with exfat_disk(tmp_path / "stick") as stick:
        a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
        a.root.mkdir()
        b.root = stick / "b"
        (a.root / "DIR").mkdir()
        (a.root / "DIR" / "y").write_text("in DIR\n")
        (a.root / "Dir").mkdir()
        (a.root / "Dir" / "x").write_text("in Dir\n")
        a.run("init", str(a.root))
        before = snapshot(a.root)
        with a.serving():
            token = a.run("invite", "--no-wait", "--dir", str(a.root)).stdout.strip()
            joined = b.run("join", token, str(b.root), check=False)
        b.run("scan", "--dir", str(b.root))
        with b.serving() as address:
            a.sync(address)
        assert snapshot(a.root) == before
        assert snapshot(b.root) == {"DIR": ("dir",), "DIR/y": ("file", b"in DIR\n", 0o777)}
        assert "Dir is here under another spelling" in joined.stderr, joined.stderr
        assert joined.returncode == 3  # (a file not written)


def test_the_sticks_mode_is_not_recorded_as_a_change_of_permission_bits(tmp_path: Path) -> None:
    """exFAT shows every file with the mount's mode (0o777 here) and ignores chmod: a
    scan of the stick took that mode for the person's change and sent it to every peer,
    whose files became writable by all. Now the recorded bits stand on such a disk (an
    edit keeps them too) and a new file gets 0o644."""
    with exfat_disk(tmp_path / "stick") as stick:
        a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
        a.root.mkdir()
        (a.root / "run.sh").write_text("echo hi\n")
        (a.root / "run.sh").chmod(0o755)
        (a.root / "notes.txt").write_text("first\n")
        (a.root / "notes.txt").chmod(0o600)
        a.run("init", str(a.root))
        with a.serving():
            token = a.run("invite", "--no-wait", "--dir", str(a.root)).stdout.strip()
            b.run("join", token, str(stick / "b"))
        b.root = stick / "b"
        assert (b.root / "notes.txt").stat().st_mode & 0o777 == 0o777  # (the mount's mode)
        (b.root / "notes.txt").write_text("edited on the stick\n")
        (b.root / "new.txt").write_text("made on the stick\n")
        os.utime(b.root / "run.sh")  # (touched: read again, same bytes)
        b.run("scan", "--dir", str(b.root))
        with b.serving() as address:
            a.sync(address)
        assert (a.root / "notes.txt").read_text() == "edited on the stick\n"
        modes = {name: (a.root / name).stat().st_mode & 0o777 for name in os.listdir(a.root)}
        assert modes == {"run.sh": 0o755, "notes.txt": 0o600, "new.txt": 0o644, ".backer": 0o700}


def _link_answers(root: Path) -> list[str]:
    """What ``os.link`` answers in ``root`` onto a name taken, onto a free one and from a
    missing source; by paths and by the folder's descriptor, as the content store links."""
    (root / "one").write_bytes(b"one")
    (root / "taken").write_bytes(b"taken")
    folder = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    answers = []
    try:
        for source, target in (("one", "taken"), ("one", "free"), ("missing", "free")):
            by_path = ((root / source, root / target), {})
            by_folder = ((source, target), {"src_dir_fd": folder, "dst_dir_fd": folder})
            for args, at in (by_path, by_folder):
                try:
                    os.link(*args, **at)
                    answers.append("linked")
                except OSError as exc:
                    answers.append(errno.errorcode[exc.errno])
    finally:
        os.close(folder)
    return answers


def test_the_simulations_disk_without_hard_links_answers_a_link_as_exfat_does(
    tmp_path: Path,
) -> None:
    """The simulation's node without hard links (family ``nolinks``) refused every link
    with EPERM, also onto a name already taken, where the kernel looks the name up and
    answers EEXIST before it asks the filesystem. So the content store, whose entry for
    a content was there already (a copy), copied over it the share file recorded with
    that content, which its person had rewritten in place since: a wrong model, and a
    false data loss (seed 185101 of the default world with ``nolinks``: 'node1 changed
    a/x.log without keeping its old bytes'). On a real mount the store finds the entry
    and keeps it."""
    with exfat_disk(tmp_path / "stick") as stick:
        real = _link_answers(stick)
    modelled = tmp_path / "modelled"
    modelled.mkdir()
    disks = Disks()
    disks.no_hard_links(modelled)
    with disks.installed():
        model = _link_answers(modelled)
    assert real == ["EEXIST"] * 2 + ["EPERM"] * 2 + ["ENOENT"] * 2
    assert model == real


def test_repair_on_exfat_recognises_a_file_the_stick_was_behind_on(tmp_path: Path) -> None:
    """``backer repair`` takes a file on disk equal to an older version of its path as
    that version (the next sync updates it). It compared permission bits too, and on
    exFAT every file shows the mount's 0o777: it recognised nothing there, the scan
    after it adopted the file, and the report said "0 older ones"."""
    with exfat_disk(tmp_path / "stick") as stick:
        a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
        a.root.mkdir()
        (a.root / "photo.bin").write_bytes(b"the first photo" * 1000)
        a.run("init", str(a.root))
        with a.serving() as address:
            token = a.run("invite", "--no-wait", "--dir", str(a.root)).stdout.strip()
            b.run("join", token, str(stick / "b"))
            b.root = stick / "b"
            old = (b.root / "photo.bin").read_bytes()
            (a.root / "photo.bin").write_bytes(b"a newer photo")
            b.sync(address)  # the node scans a's edit as b connects
            (b.root / ".backer").rename(stick / "lost")  # (rmtree is slow through FUSE)
            (b.root / "photo.bin").write_bytes(old)  # as if it had never received it
            out = b.run("repair", "--from", address, "--dir", str(b.root)).stdout
            assert "(1 older ones" in out and "recorded 0 added and 0 modified" in out, out
            b.sync(address)
        assert (b.root / "photo.bin").read_bytes() == b"a newer photo"
        assert sorted(os.listdir(b.root)) == sorted(os.listdir(a.root))  # no conflict copy
