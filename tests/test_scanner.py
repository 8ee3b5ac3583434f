"""The scanner on real files: what it records, what it skips, what it never trusts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import unicodedata
from pathlib import Path

import pytest

from backer.fs.paths import BadPath, check
from backer.model.records import Kind
from backer.model.share import Share
from backer.scanner.content import manifest_of_bytes
from backer.scanner.ignore import temp_name
from backer.scanner.walk import Seen, read_stable
from backer.versioner.store import held_bytes
from tests.helpers import live, make_devices, sync


def age(path: Path, seconds: int = 10) -> None:
    """Backdate a file so that its mtime is not 'fresh' (see scanner.FRESH_NS)."""
    info = path.lstat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns - seconds * 10**9), follow_symlinks=False)


def test_records_files_dirs_symlinks_exec_bit_and_empty_dirs(share: Share) -> None:
    root = share.root
    (root / "docs").mkdir()
    (root / "docs" / "a.txt").write_bytes(b"hello")
    (root / "empty").mkdir()
    (root / "run.sh").write_bytes(b"#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    os.symlink("../outside/secret", root / "docs" / "link")
    summary = share.scan()
    assert summary.errors == []
    versions = live(share)
    assert sorted(versions) == ["docs", "docs/a.txt", "docs/link", "empty", "run.sh"]
    assert versions["empty"].kind == Kind.DIRECTORY
    assert versions["run.sh"].executable and not versions["docs/a.txt"].executable
    assert versions["docs/link"].kind == Kind.SYMLINK
    assert versions["docs/link"].link_target == "../outside/secret"
    assert versions["docs/a.txt"].content == manifest_of_bytes(b"hello").id


def test_symlinked_directories_are_never_followed(share: Share, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "private.txt").write_text("not ours")
    os.symlink(outside, share.root / "escape")
    share.scan()
    assert sorted(live(share)) == ["escape"]


def test_unchanged_files_are_not_rehashed(share: Share) -> None:
    for n in range(20):
        (share.root / f"f{n}").write_bytes(os.urandom(1000))
        age(share.root / f"f{n}")
    first = share.scan()
    assert first.hashed_bytes == 20_000
    second = share.scan()
    assert (second.hashed_bytes, second.unchanged, second.events) == (0, 20, 0)


def test_touched_but_identical_file_makes_no_new_version(share: Share) -> None:
    path = share.root / "a"
    path.write_bytes(b"same")
    age(path)
    share.scan()
    os.utime(path)  # new mtime, same bytes
    summary = share.scan()
    assert summary.modified == [] and summary.events == 0 and summary.hashed_bytes == 4


def test_fresh_mtime_is_rehashed_next_time(share: Share) -> None:
    path = share.root / "a"
    path.write_bytes(b"one")
    share.scan()
    # same size, same mtime second — a write the stat cache alone could miss
    info = path.stat()
    path.write_bytes(b"two")
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert share.scan().modified == ["a"]


def test_mtime_in_this_devices_future_is_not_rehashed_on_every_scan(share: Share) -> None:
    """A device whose clock is behind receives files with mtimes in its future."""
    path = share.root / "from-a-fast-clock"
    path.write_bytes(b"x" * 5000)
    ahead = path.stat().st_mtime_ns + 3600 * 10**9
    os.utime(path, ns=(ahead, ahead))
    assert share.scan().hashed_bytes == 5000
    again = share.scan()
    assert (again.hashed_bytes, again.unchanged) == (0, 1)
    path.write_bytes(b"y" * 5000)  # a local write moves the mtime back to now: noticed
    assert share.scan().modified == ["from-a-fast-clock"]


def test_received_file_with_a_future_mtime_is_trusted_after_it_is_written(
    tmp_path: Path,
) -> None:
    a, b = make_devices(tmp_path, 2)
    path = a.root / "report.pdf"
    path.write_bytes(os.urandom(20_000))
    ahead = path.stat().st_mtime_ns + 3600 * 10**9
    os.utime(path, ns=(ahead, ahead))
    a.scan()
    sync(a, b)
    assert (b.root / "report.pdf").stat().st_mtime_ns == ahead
    for _ in range(2):
        assert b.scan().hashed_bytes == 0


def test_ignore_rules_and_defaults(share: Share) -> None:
    root = share.root
    (root / ".backerignore").write_text("*.log\nbuild/\n!keep.log\n")
    (root / "x.log").write_text("x")
    (root / "keep.log").write_text("k")
    (root / "build").mkdir()
    (root / "build" / "out.o").write_text("o")
    (root / temp_name("download.bin", "v1")).write_text("partial download")
    share.scan()
    assert sorted(live(share)) == [".backerignore", "keep.log"]


def test_nfd_name_is_recorded_as_spelled_on_disk(share: Share) -> None:
    decomposed = unicodedata.normalize("NFD", "café.txt")
    (share.root / decomposed).write_text("x")
    summary = share.scan()
    assert list(live(share)) == [decomposed] and summary.errors == []
    assert share.scan().events == 0


def test_names_equal_but_for_normalisation_or_case_are_kept_reported_and_stable(
    share: Share,
) -> None:
    nfc, nfd = (unicodedata.normalize(form, "résumé.txt") for form in ("NFC", "NFD"))
    (share.root / nfc).write_text("composed")
    (share.root / nfd).write_text("decomposed")
    (share.root / "README").write_text("upper")
    (share.root / "readme").write_text("lower")
    first = share.scan()
    assert sorted(live(share)) == sorted(["README", "readme", nfc, nfd])
    reported = sorted(e.path for e in first.errors)
    assert reported == sorted([max(nfc, nfd), "readme"])  # the later name, by code point
    for _ in range(2):  # no loop: the same report, nothing recorded again
        again = share.scan()
        assert again.events == 0 and again.errors == first.errors


def test_reserved_names_are_refused_case_and_normalisation_folded() -> None:
    for bad in (".backer/x", ".Backer/backer.db", "a/.BACKER/x", "a/.backer"):
        with pytest.raises(BadPath):
            check(bad)
    for good in (unicodedata.normalize("NFD", "café"), "a/.backerignore", "backer/x"):
        assert check(good) == good


def test_init_on_the_parent_of_a_share_skips_its_metadata(tmp_path: Path, key) -> None:
    inner = tmp_path / "outer" / "inner"
    inner.mkdir(parents=True)
    (inner / "photo.jpg").write_bytes(b"jpeg")
    Share.create(inner, key).close()
    (tmp_path / "outer" / ".Backer").mkdir()
    share = Share.create(tmp_path / "outer", key)
    summary = share.scan()
    assert sorted(live(share)) == ["inner", "inner/photo.jpg"]
    assert [f"{e.path}: {e.reason}" for e in summary.errors] == [
        ".Backer: skipped: reserved name (backer's metadata directory is .backer)",
        "inner/.backer: skipped: the metadata of another share inside this one",
    ]


def test_rename_and_delete_of_a_directory(share: Share) -> None:
    (share.root / "d").mkdir()
    (share.root / "d" / "f").write_text("x")
    share.scan()
    (share.root / "d").rename(share.root / "e")
    summary = share.scan()
    assert summary.added == ["e", "e/f"] and summary.deleted == ["d", "d/f"]
    assert live(share)["d/f"].kind == Kind.DELETED
    shutil.rmtree(share.root / "e")
    assert share.scan().deleted == ["e", "e/f"]


def test_file_changed_while_being_read_is_read_again(share: Share) -> None:
    path = share.root / "busy"
    path.write_bytes(b"before")
    info = path.lstat()
    stale = Seen(
        "busy", path, Kind.FILE, info.st_size, info.st_mtime_ns - 1, info.st_ino, info.st_mode
    )
    current, _, content, error = read_stable(stale)
    assert error is None
    assert content == manifest_of_bytes(b"before").id
    assert current.mtime_ns == info.st_mtime_ns  # recorded with the stat it was read under


def test_file_that_vanishes_while_being_read_is_reported(share: Share) -> None:
    path = share.root / "gone"
    path.write_bytes(b"x")
    info = path.lstat()
    seen = Seen("gone", path, Kind.FILE, info.st_size, info.st_mtime_ns, info.st_ino, info.st_mode)
    path.unlink()
    _, manifest, _, error = read_stable(seen)
    assert manifest is None and error is not None and "cannot read" in error.reason


UNREADABLE_SCRIPT = """
import sys
from pathlib import Path
import nacl.signing
from backer.model.share import Share
root = Path(sys.argv[1])
share = Share.open(root, nacl.signing.SigningKey(bytes(32)))
summary = share.scan()
print("|".join(f"{e.path}: {e.reason}" for e in summary.errors))
print("|".join(summary.deleted))
"""


def _without_file_override() -> list[str]:
    """Root reads everything; drop that power so unreadable files are unreadable."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot make a file unreadable")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


def test_unreadable_files_and_dirs_are_reported_never_deleted(tmp_path: Path) -> None:
    import nacl.signing

    prefix = _without_file_override()
    root = tmp_path / "share"
    root.mkdir()
    share = Share.create(root, nacl.signing.SigningKey(bytes(32)))
    (root / "secret.txt").write_text("s")
    (root / "private").mkdir()
    (root / "private" / "inner.txt").write_text("i")
    share.scan()
    share.close()
    if prefix:
        subprocess.run(["chown", "-R", "65534:65534", str(root / "secret.txt")], check=True)
        subprocess.run(["chown", "-R", "65534:65534", str(root / "private")], check=True)
    (root / "secret.txt").chmod(0)
    (root / "private").chmod(0)
    age(root / "secret.txt")
    result = subprocess.run(
        [*prefix, sys.executable, "-c", UNREADABLE_SCRIPT, str(root)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
        check=True,
    )
    errors, deleted = result.stdout.splitlines()
    assert "secret.txt: cannot read" in errors and "private: cannot list directory" in errors
    assert deleted == ""


def test_temp_links_of_an_interrupted_apply_are_removed_like_temp_files(share: Share) -> None:
    """Links are staged under a temp name too; one left by a crash was neither removed
    nor recorded (found by the campaign, seed 580)."""
    link, file = temp_name("link", "v1"), temp_name("file", "v2")
    os.symlink("target", share.root / link)
    (share.root / file).write_text("partial")
    share.scan()
    assert not os.path.lexists(share.root / link)
    assert not (share.root / file).exists()
    assert list(live(share)) == []


def test_a_kept_temp_at_a_path_that_became_ignored_is_swept(share: Share) -> None:
    """A temp kept for a later attempt at a version this device will never write (its
    rules now ignore the path) stayed for good: found by the simulations, seed 10."""
    root = share.root
    (root / "f.txt").write_text("to be received")
    share.scan()
    vid = share.catalog.local_entries(["f.txt"])["f.txt"].version_id
    with share.db.conn:  # as on a device that has the version but not yet its bytes
        share.catalog.drop_local(["f.txt"])
    (root / "f.txt").unlink()
    temp = root / temp_name("f.txt", vid)
    temp.write_text("to be rec")  # what an interrupted transfer left
    share.scan()
    assert temp.exists()  # kept: the next attempt re-uses its verified chunks
    (root / ".backerignore").write_text("f.txt\n")
    share.scan()
    assert not temp.exists()


def test_a_directorys_mtime_is_recorded_with_a_change_of_its_entries_not_alone(
    share: Share,
) -> None:
    """A directory is a file whose content is its entries: like a touched file, a
    touched directory makes no new version; an entry added records its new mtime."""
    (share.root / "d").mkdir()
    os.utime(share.root / "d", ns=(10**18, 10**18))
    share.scan()
    assert live(share)["d"].mtime_ns == 10**18
    os.utime(share.root / "d", ns=(2 * 10**18, 2 * 10**18))
    assert share.scan().events == 0
    (share.root / "d" / "new.txt").write_text("an entry")
    os.utime(share.root / "d", ns=(3 * 10**18, 3 * 10**18))
    summary = share.scan()
    assert summary.modified == ["d"] and summary.added == ["d/new.txt"]
    assert live(share)["d"].mtime_ns == 3 * 10**18


def test_an_invalid_ignore_pattern_is_skipped_and_reported_not_fatal(share: Share) -> None:
    """A garbled .backerignore line made every scan fail with an internal error
    (pathspec's GitIgnorePatternError; simulation seed 6456)."""
    (share.root / ".backerignore").write_bytes(b"*.log\n\x14\xff\xfeEv#\xc3y\\\n")
    (share.root / "kept.txt").write_text("kept")
    (share.root / "noise.log").write_text("ignored")
    summary = share.scan()
    assert "kept.txt" in summary.added and "noise.log" not in summary.added
    (warning,) = [p for p in summary.errors if p.path == ".backerignore"]
    assert warning.warning and "pattern skipped, not valid" in warning.reason


def test_an_ignore_pattern_with_a_reversed_range_is_skipped_not_fatal(share: Share) -> None:
    """`[z-a]` passes gitignore parsing but fails as a regular expression (re.error,
    not a ValueError): every scan failed with an internal error."""
    (share.root / ".backerignore").write_text("*.log\n[z-a]\n")
    (share.root / "kept.txt").write_text("kept")
    (share.root / "noise.log").write_text("ignored")
    summary = share.scan()
    assert "kept.txt" in summary.added and "noise.log" not in summary.added
    (warning,) = [p for p in summary.errors if p.path == ".backerignore"]
    assert "[z-a]" in warning.reason


def test_R2_a_backerignore_that_is_not_a_regular_file_is_never_read(
    share: Share, tmp_path: Path
) -> None:
    """A member can make .backerignore a link (links replicate): to a fifo it froze every
    device's scan in open(), to a file outside the share it took that file's bytes as
    rules. Neither, nor a folder or a huge file, is read: one warning, no rules."""
    ignore = share.root / ".backerignore"
    (share.root / "kept.txt").write_text("kept")
    secret = tmp_path / "secret"
    secret.write_text("*.txt\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    frozen: list[bool] = []
    scanned = threading.Event()

    def release() -> None:  # every 5 s, a reader blocked in open() is let go, and noted
        while not scanned.wait(5):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # (ENXIO: nobody is reading it, good)
                continue
            frozen.append(True)

    releasing = threading.Thread(target=release, daemon=True)
    releasing.start()
    try:
        for target in (secret, fifo):
            ignore.unlink(missing_ok=True)
            ignore.symlink_to(target)
            share.scan()
            assert not frozen, "the scan waited in the fifo's open() until a writer came"
            assert "kept.txt" in live(share)
            assert [p.reason for p in share.problems.values()] == [
                ".backerignore is a link, not read"
            ]
    finally:
        scanned.set()
        releasing.join()
    ignore.unlink()
    ignore.mkdir()
    share.scan()
    assert [p.reason for p in share.problems.values()] == [
        ".backerignore is not a regular file, not read"
    ]
    ignore.rmdir()
    ignore.write_bytes(b"*.txt\n" + b"#" * (1024 * 1024))
    share.scan()
    assert "kept.txt" in live(share)
    assert [p.reason for p in share.problems.values()] == [
        ".backerignore is larger than 1048576 bytes, not read"
    ]


def test_a_folder_whose_mtime_a_temp_moved_is_recorded_with_an_entry_changed_in_place(
    share: Share,
) -> None:
    """A file rewritten in place moves no folder's mtime, but a temp of backer's made
    and gone in that folder (a window's) does: the scan that records the file records
    the folder with it, its mtime moved, as for any entry changed in it (the simulation
    took that folder for the node's own applied write: seed 200304)."""
    (share.root / "b").mkdir()
    (share.root / "b" / "g").write_bytes(b"as first written")
    an_hour_ago = time.time_ns() - 3600 * 10**9  # (the temp surely moves it)
    os.utime(share.root / "b", ns=(an_hour_ago, an_hour_ago))
    share.scan()
    temp = share.root / "b" / temp_name("b/g", "v1")
    temp.write_bytes(b"")
    temp.unlink()
    with open(share.root / "b" / "g", "r+b") as handle:
        handle.write(b"AS")
    assert share.scan(paths=["b/g"]).modified == ["b", "b/g"]


def test_an_older_version_a_killed_window_wrote_from_its_plan_is_that_version(
    tmp_path: Path,
) -> None:
    """A window planned while version one of ``f`` was live here writes it even once
    version two has come (a plan is applied as planned); killed after moving it into
    place, before its scan-cache entry, it left ``f`` unrecorded with version one's
    bytes, and the next scan recorded them as this device's new file beside version
    two: a conflict on every device (seed 200044: 'node2 recorded its own applied
    writes as edits'). It is version one, adopted; the next sync puts version two in
    its place and keeps version one's bytes."""
    a, b = make_devices(tmp_path, 2)
    (a.root / "f").write_bytes(b"version one")
    a.scan()
    (a.root / "f").write_bytes(b"version two, which replaced one")
    sync(a, b)
    (two,) = b.catalog.live_versions("f")
    with b.db.conn:  # as the killed window left b
        b.catalog.drop_local(["f"])
    (b.root / "f").unlink()
    (b.root / "f").write_bytes(b"version one")
    assert b.scan().events == 0
    sync(a, b)
    assert (b.root / "f").read_bytes() == b"version two, which replaced one"
    assert list(b.catalog.live_versions("f")) == [two]
    assert held_bytes(b.root, b.catalog, manifest_of_bytes(b"version one").id) == b"version one"


def test_a_deleted_file_restored_from_a_backup_is_a_new_file_and_stays(
    tmp_path: Path,
) -> None:
    """The person deleted ``f`` and later put it back from a backup, its bytes those of
    the version the deletion replaced: a new file of theirs, recorded and sent. Taken
    for that old version (as a killed window's leftover is, above), the next window
    deleted it again on both devices."""
    a, b = make_devices(tmp_path, 2)
    (a.root / "f").write_bytes(b"version one")
    sync(a, b)
    (a.root / "f").unlink()
    a.scan()
    sync(a, b)
    (a.root / "f").write_bytes(b"version one")  # from the backup
    assert a.scan().added == ["f"]
    sync(a, b)
    assert (a.root / "f").read_bytes() == (b.root / "f").read_bytes() == b"version one"


def test_a_directory_is_not_recorded_again_for_an_entry_adopted_as_a_live_version(
    tmp_path: Path,
) -> None:
    """An entry that appears unrecorded but equal to a live version (a path no longer
    ignored; a missing parent a waiting window made) is adopted, not recorded: the
    mtime it moved on its directory is no edit either, or every peer would get a
    version of the directory that nobody made (hostile seed 2)."""
    a, b = make_devices(tmp_path, 2)
    (a.root / "d").mkdir()
    sync(a, b)
    (a.root / "d" / "e").mkdir()
    (b.root / ".backerignore").write_bytes(b"e\n")
    sync(a, b)
    assert not (b.root / "d" / "e").exists()
    before = live(b)["d"]
    (b.root / "d" / "e").mkdir()
    old = time.time() - 60
    os.utime(b.root / "d", (old, old))
    (b.root / ".backerignore").write_bytes(b"zzz\n")
    summary = b.scan()
    assert summary.added == [] and summary.modified == [".backerignore"]
    assert live(b)["d"] == before
    assert b.catalog.local_entries(["d"])["d"].mtime_ns == (b.root / "d").stat().st_mtime_ns
