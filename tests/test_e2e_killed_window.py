"""A device killed while a window moves received files into place: what it wrote is
taken for what it received at its next scan, never for an edit of its own."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e import Device, joined_pair

REPO = Path(__file__).resolve().parent.parent


def _backer_dying_where(patch: str) -> str:
    """A ``python -c`` script: the real CLI (its arguments), with ``patch`` run first to
    make the process SIGKILL itself at one point of its work."""
    return f"import os, signal, sys\nfrom backer.cli import main\n{patch}" + (
        'sys.argv = ["backer", *sys.argv[1:]]\nmain()\n'
    )


_SYNC_DYING_AT_ITS_CACHE = _backer_dying_where(
    """
from backer.db.catalog import Catalog
set_local = Catalog.set_local
def die_at_the_windows_cache(catalog, entries):
    if sys._getframe(1).f_code.co_name == "_commit":  # the files are in place
        os.kill(os.getpid(), signal.SIGKILL)
    set_local(catalog, entries)
Catalog.set_local = die_at_the_windows_cache
"""
)


def test_R41_files_written_by_a_window_killed_before_its_cache_are_not_recorded_as_edits(
    tmp_path: Path,
) -> None:
    """Killed after a window moved its files into place, before it wrote their scan
    cache: the next scan took each received file for this device's own edit of the
    version it held before, concurrent with the one received (the same bytes), and
    every device got a conflict per file."""
    a, b, ports = joined_pair(tmp_path)
    names = [f"f{n}" for n in range(3)]
    for name in names:
        (a.root / name).write_bytes(os.urandom(50_000))
    a.run("scan", "--dir", str(a.root), "-q")
    with a.serving(ports[0]) as address:
        b.sync(address)
        for name in names:  # edited on a, as an editor saves
            staged = tmp_path / "new"
            staged.write_bytes(os.urandom(50_000))
            os.replace(staged, a.root / name)
        a.run("scan", "--dir", str(a.root), "-q")
        script = [sys.executable, "-c", _SYNC_DYING_AT_ITS_CACHE, "sync", address]
        died = subprocess.run([*script, "--dir", str(b.root)], env=b.env, cwd=REPO)
        assert died.returncode == -signal.SIGKILL
        assert all((b.root / n).read_bytes() == (a.root / n).read_bytes() for n in names)
        b.run("scan", "--dir", str(b.root), "-q")
        b.sync(address)
    for device in (a, b):
        conflicts = device.run("conflicts", "--dir", str(device.root), "--json").stdout
        assert json.loads(conflicts) == [], device.root.name
        for name in names:
            history = json.loads(device.run("history", str(device.root / name), "--json").stdout)
            assert [v["live"] for v in history] == [False, True], (device.root.name, name)


_SYNC_DYING_AFTER_A_DELETION = _backer_dying_where(
    """
from backer.db.catalog import Catalog
drop_local = Catalog.drop_local
def die_after_the_unlink(catalog, paths):
    if sys._getframe(1).f_code.co_name == "_delete":  # the file is gone, not its entry
        os.kill(os.getpid(), signal.SIGKILL)
    drop_local(catalog, paths)
Catalog.drop_local = die_after_the_unlink
"""
)


def test_a_deletion_applied_by_a_window_killed_before_its_commit_is_not_recorded_again(
    tmp_path: Path,
) -> None:
    """Killed after a window removed a file it received the deletion of, before the
    transaction that drops its scan-cache entry: the next scan found the file gone and
    recorded this device's own deletion of the version the deletion received had
    already replaced, two live deletions of one version (the simulations' ``kills``
    family, 'recorded a change twice')."""
    a, b, ports = joined_pair(tmp_path)
    (a.root / "f").write_bytes(os.urandom(50_000))
    a.run("scan", "--dir", str(a.root), "-q")
    with a.serving(ports[0]) as address:
        b.sync(address)
        (a.root / "f").unlink()
        a.run("scan", "--dir", str(a.root), "-q")
        script = [sys.executable, "-c", _SYNC_DYING_AFTER_A_DELETION, "sync", address]
        died = subprocess.run([*script, "--dir", str(b.root)], env=b.env, cwd=REPO)
        assert died.returncode == -signal.SIGKILL
        assert not (b.root / "f").exists()
        b.run("scan", "--dir", str(b.root), "-q")
        b.sync(address)
    for device in (a, b):
        history = json.loads(device.run("history", str(device.root / "f"), "--json").stdout)
        assert [(v["kind"], v["live"]) for v in history] == [
            ("file", False),
            ("deleted", True),
        ], device.root.name


def test_a_version_replaced_by_a_window_killed_before_its_cache_stays_restorable(
    tmp_path: Path,
) -> None:
    """Killed after a window moved a received file over the one it had written before,
    before its commit: the next scan adopted the new file (R41), but the old version's
    chunk locations still named the path, which now held other bytes, and not its
    store entry: its bytes were in `.backer/store`, and no restore could read them."""
    a, b, ports = joined_pair(tmp_path)
    first = os.urandom(50_000)
    (a.root / "f").write_bytes(first)
    a.run("scan", "--dir", str(a.root), "-q")
    with a.serving(ports[0]) as address:
        b.sync(address)
        old = json.loads(b.run("history", str(b.root / "f"), "--json").stdout)[0]["version"]
        staged = tmp_path / "new"
        staged.write_bytes(os.urandom(50_000))
        os.replace(staged, a.root / "f")
        a.run("scan", "--dir", str(a.root), "-q")
        script = [sys.executable, "-c", _SYNC_DYING_AT_ITS_CACHE, "sync", address]
        died = subprocess.run([*script, "--dir", str(b.root)], env=b.env, cwd=REPO)
        assert died.returncode == -signal.SIGKILL
        b.run("scan", "--dir", str(b.root), "-q")
    target = tmp_path / "restored"  # (a is gone: b's own store must serve it)
    b.run("restore", str(b.root / "f"), "--version", old, "--to", str(target))
    assert target.read_bytes() == first


_SYNC_DYING_AT_ITS_FIRST_WINDOW = _backer_dying_where(
    """
from backer.model.materializer import Materializer
def die(*args, **kwargs):  # the conflict is resolved and recorded; nothing is written
    os.kill(os.getpid(), signal.SIGKILL)
Materializer.start = die
"""
)


def test_a_path_a_killed_restore_removed_is_not_deleted_again_when_its_version_went_to_a_copy(
    tmp_path: Path,
) -> None:
    """The file at ``f`` held this device's version, which lost a conflict (its copy
    carries it: recorded, not yet written) when a restore to a moment before ``f``
    deleted the winner and removed the file, and was killed before its commit: the next
    scan found ``f`` gone, the scan cache still naming the lost version, and recorded a
    deletion of it beside the restore's — a version no longer live at ``f`` deleted
    again (the simulations' ``kills`` family, seed 2280)."""
    a, b, ports = joined_pair(tmp_path)
    (a.root / "g").write_bytes(b"before f")
    a.run("scan", "--dir", str(a.root), "-q")
    time.sleep(1.1)
    moment = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
    time.sleep(1.1)
    _edit_on_both(a, b, ports)
    mine = (a.root / "f").read_bytes()
    with b.serving(ports[1]) as address:
        script = [sys.executable, "-c", _SYNC_DYING_AT_ITS_FIRST_WINDOW, "sync", address]
        died = subprocess.run([*script, "--dir", str(a.root)], env=a.env, cwd=REPO)
        assert died.returncode == -signal.SIGKILL
    assert (a.root / "f").read_bytes() == mine  # the lost version, where it was
    script = [sys.executable, "-c", _SYNC_DYING_AFTER_A_DELETION, "restore", str(a.root)]
    died = subprocess.run([*script, "--at", moment], env=a.env, cwd=REPO)
    assert died.returncode == -signal.SIGKILL
    assert not (a.root / "f").exists()
    a.run("scan", "--dir", str(a.root), "-q")
    history = json.loads(a.run("history", str(a.root / "f"), "--json").stdout)
    assert [(v["kind"], v["live"]) for v in history if v["live"]] == [("deleted", True)]
    assert len(history) == 4  # the first version, the two edits, the restore's deletion


def _edited_on_both(tmp_path: Path) -> tuple[Device, Device, tuple[int, int]]:
    """Two joined devices that each edited ``f`` (b's edit the later) and scanned, not
    synced since: their next sync is a conflict that b's version wins."""
    a, b, ports = joined_pair(tmp_path)
    _edit_on_both(a, b, ports)
    return a, b, ports


def _edit_on_both(a: Device, b: Device, ports: tuple[int, int]) -> None:
    """``f`` made on a and synced to b, then edited on each (b's edit the later) and
    scanned, not synced since."""
    (a.root / "f").write_bytes(os.urandom(50_000))
    a.run("scan", "--dir", str(a.root), "-q")
    with a.serving(ports[0]) as address:
        b.sync(address)
    hour_ago = time.time_ns() - 3600 * 10**9
    for device, mtime in ((a, hour_ago), (b, time.time_ns())):  # b's edit is the later
        (device.root / "f").write_bytes(os.urandom(50_000))
        os.utime(device.root / "f", ns=(mtime, mtime))
        device.run("scan", "--dir", str(device.root), "-q")


def test_the_winner_of_a_conflict_a_killed_window_moved_into_place_is_not_recorded_as_an_edit(
    tmp_path: Path,
) -> None:
    """A window that resolved a conflict (this device's version of ``f`` lost to a
    concurrent one, now carried by its conflict copy) moved the winner into place and
    was killed before its cache: the next scan took the winner's bytes for this
    device's own edit of the version it had held, a new version beside the winner; and
    as that version replaced the one the conflict copy carries, the copy was moot and
    went from every device (the simulations' ``kills`` family, seed 314)."""
    a, b, ports = _edited_on_both(tmp_path)
    mine, theirs = (a.root / "f").read_bytes(), (b.root / "f").read_bytes()
    with b.serving(ports[1]) as address:
        script = [sys.executable, "-c", _SYNC_DYING_AT_ITS_CACHE, "sync", address]
        died = subprocess.run([*script, "--dir", str(a.root)], env=a.env, cwd=REPO)
        assert died.returncode == -signal.SIGKILL
        assert (a.root / "f").read_bytes() == theirs
        a.run("scan", "--dir", str(a.root), "-q")
        a.sync(address)
    history = json.loads(a.run("history", str(a.root / "f"), "--json").stdout)
    assert len(history) == 3, history  # the first version and the two edits
    (copy,) = a.root.glob("f.sync-conflict-*")
    assert copy.read_bytes() == mine
    assert (b.root / copy.name).read_bytes() == mine


def test_a_folder_a_killed_restore_removed_a_file_from_keeps_its_version(
    tmp_path: Path,
) -> None:
    """A restore to a moment before ``d/new`` was made removed it and was killed before
    its commit: the next scan took the deletion for the one recorded, but recorded
    ``d`` anew for the time the removal moved, an edit nobody made that went to every
    device (the simulations' ``kills`` family, seeds 523 and 1047)."""
    device = Device(tmp_path, "a")
    (device.root / "d").mkdir(parents=True)
    (device.root / "d" / "old").write_bytes(b"before the moment")
    device.run("init", str(device.root), "-q")
    time.sleep(1.1)
    moment = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
    time.sleep(1.1)
    (device.root / "d" / "new").write_bytes(os.urandom(50_000))
    device.run("scan", "--dir", str(device.root), "-q")
    folder = json.loads(device.run("history", str(device.root / "d"), "--json").stdout)
    script = [sys.executable, "-c", _SYNC_DYING_AFTER_A_DELETION, "restore", str(device.root)]
    died = subprocess.run([*script, "--at", moment], env=device.env, cwd=REPO)
    assert died.returncode == -signal.SIGKILL
    assert not (device.root / "d" / "new").exists()
    device.run("scan", "--dir", str(device.root), "-q")
    assert json.loads(device.run("history", str(device.root / "d"), "--json").stdout) == folder


def test_a_file_whose_version_lost_a_conflict_rewritten_in_place_as_the_winner_is_an_edit(
    tmp_path: Path,
) -> None:
    """This device's version of ``f`` lost a conflict (its copy recorded, not yet
    written: the sync died first) and the person rewrote the file in place with the
    winner's very bytes: that is their edit of the version the copy carries, whose bytes
    went with it, not the winner put there by a window; taken for the winner, the copy
    stayed live with its bytes on no disk (the simulations' ``kills`` family, seed 400
    of ``kills,resident``)."""
    a, b, ports = _edited_on_both(tmp_path)
    with b.serving(ports[1]) as address:
        script = [sys.executable, "-c", _SYNC_DYING_AT_ITS_FIRST_WINDOW, "sync", address]
        died = subprocess.run([*script, "--dir", str(a.root)], env=a.env, cwd=REPO)
        assert died.returncode == -signal.SIGKILL
        inode = os.stat(a.root / "f").st_ino
        with open(a.root / "f", "r+b") as edited:  # in place: the inode stays
            edited.write((b.root / "f").read_bytes())
        assert os.stat(a.root / "f").st_ino == inode
        a.run("scan", "--dir", str(a.root), "-q")
        a.sync(address)
    history = json.loads(a.run("history", str(a.root / "f"), "--json").stdout)
    assert len(history) == 4, history  # the first version, the two edits, the person's
    assert not list(a.root.glob("f.sync-conflict-*"))  # (moot: its version was edited)
