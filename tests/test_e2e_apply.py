"""Applying received files through the real CLI over TCP: every entry kind, full disks,
odd names, interrupted transfers, links that point out of the share."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from backer.model.materializer import LEFT_OUT
from backer.scanner.ignore import is_temp_name
from tests.e2e import Device, free_port, invite, slowed, snapshot, summary_number
from tests.helpers import small_disk


def _founder(tmp_path: Path) -> tuple[Device, Device]:
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    a.root.mkdir()
    return a, b


def test_a_share_with_a_symlink_and_a_20_mb_file_is_joined_and_synced(tmp_path: Path) -> None:
    a, b = _founder(tmp_path)
    os.symlink("big.bin", a.root / "link")
    (a.root / "big.bin").write_bytes(os.urandom(20 * 1024 * 1024))
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with a.serving(port) as address:
        b.run("join", token, str(b.root))
        assert snapshot(b.root) == snapshot(a.root)
        (a.root / "link").unlink()
        os.symlink("elsewhere", a.root / "link")
        (a.root / "big.bin").write_bytes(os.urandom(20 * 1024 * 1024))
        out = b.sync(address)
    assert "errors 0" in out, out
    assert snapshot(b.root) == snapshot(a.root)


def _same_or_absent(source: Path, replica: Path) -> None:
    """Every file the replica holds is byte-identical to the source's; no temp files."""
    theirs = snapshot(source)
    for path, entry in snapshot(replica).items():
        assert entry == theirs[path], path
    assert not [p for p in replica.rglob("*") if is_temp_name(p.name)]


def test_join_into_a_full_disk_stops_clearly_and_the_next_sync_finishes(tmp_path: Path) -> None:
    a, b = _founder(tmp_path)
    for n in range(8):
        (a.root / f"part{n}.bin").write_bytes(os.urandom(5 * 1024 * 1024))
    (a.root / "small.txt").write_text("small")
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with small_disk(tmp_path / "disk", "24m") as disk, a.serving(port) as address:
        b.root = disk / "b"
        result = b.run("join", token, str(b.root), check=False)
        assert result.returncode == 1, result
        *left_out, error = result.stderr.strip().splitlines()
        assert error.startswith("backer: error: disk full: "), error
        assert f"MB more needed in {b.root}" in error, error
        assert left_out[0].startswith(f"error: {LEFT_OUT}: "), left_out  # files that did
        assert all(not (b.root / line.strip()).exists() for line in left_out[1:])  # not fit
        _same_or_absent(a.root, b.root)
        result = b.run("sync", address, "--dir", str(b.root), check=False)
        assert result.returncode == 1 and "disk full: " in result.stderr
        _same_or_absent(a.root, b.root)
        subprocess.run(["mount", "-o", "remount,size=80m", str(disk)], check=True)
        b.sync(address)
        assert snapshot(b.root) == snapshot(a.root)


def test_a_replaced_symlink_never_lets_a_member_write_outside_the_share(
    tmp_path: Path,
) -> None:
    """A replaced link was once hard-linked into the kept versions as a link, and a
    member could then have the victim keep a file *through* it, outside the share. A
    link's target is kept by its recorded version: the store holds files only, named
    by content, never a link."""
    a, b = _founder(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), a.root / "evil")
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with a.serving(port) as address:
        b.run("join", token, str(b.root))
        assert os.readlink(b.root / "evil") == str(outside)
        (a.root / "evil").unlink()
        (a.root / "evil").mkdir()
        (a.root / "evil" / "payload.sh").write_text("#!/bin/sh\necho owned\n")
        b.sync(address)
        (a.root / "evil" / "payload.sh").write_text("#!/bin/sh\necho v2\n")
        b.sync(address)
    assert list(outside.iterdir()) == []
    assert not [p for p in (b.root / ".backer" / "store").rglob("*") if p.is_symlink()]
    assert snapshot(b.root) == snapshot(a.root)


def _joined(a: Device, b: Device) -> int:
    """``a`` makes a share of its root, ``b`` joins it; the port ``a`` serves on."""
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with a.serving(port):
        b.run("join", token, str(b.root))
    return port


def test_a_user_file_named_like_an_old_temp_survives_init_scan_and_sync(tmp_path: Path) -> None:
    """Every ``*.backer-tmp`` was deleted by init and scan, anywhere, silently."""
    a, b = _founder(tmp_path)
    (a.root / "notes.backer-tmp").write_text("my notes")
    (a.root / "sub").mkdir()
    (a.root / "sub" / ".x.1234abcd.backer-tmp").write_text("mine too")
    port = _joined(a, b)
    a.run("scan", "--dir", str(a.root))
    with a.serving(port) as address:
        b.sync(address)
    assert (a.root / "notes.backer-tmp").read_text() == "my notes"
    assert snapshot(b.root) == snapshot(a.root)
    assert (b.root / "sub" / ".x.1234abcd.backer-tmp").read_text() == "mine too"


def test_a_255_byte_name_reaches_a_peer(tmp_path: Path) -> None:
    """The temp name was the target's plus 21 bytes: names over 234 bytes never arrived."""
    a, b = _founder(tmp_path)
    name = "ü" * 120 + "n" * 15  # 255 bytes in UTF-8
    (a.root / name).write_text("long")
    (a.root / ("d" * 255)).mkdir()
    (a.root / ("d" * 255) / ("f" * 255)).write_bytes(os.urandom(100_000))
    os.symlink(name, a.root / ("l" * 255))
    port = _joined(a, b)
    assert snapshot(b.root) == snapshot(a.root)
    (a.root / name).write_text("longer, replaced")
    with a.serving(port) as address:
        out = b.sync(address)
    assert "errors 0" in out, out
    assert snapshot(b.root) == snapshot(a.root)


def test_a_rerun_after_an_interrupted_transfer_fetches_only_what_was_not_received(
    tmp_path: Path,
) -> None:
    """A killed transfer threw away everything received for the window in progress."""
    a, b = _founder(tmp_path)
    port = _joined(a, b)
    size = 192 * 1024 * 1024
    expected = os.urandom(size)
    (a.root / "big.bin").write_bytes(expected)
    with a.serving(port) as address:
        process = subprocess.Popen(b.command("sync", address, "--dir", str(b.root)), env=b.env)
        try:
            held = 0
            for _ in range(3000):  # at most 60 s
                temps = [p for p in b.root.iterdir() if is_temp_name(p.name)]
                held = temps[0].stat().st_blocks * 512 if temps else 0
                if held >= size // 2 or process.poll() is not None:
                    break
                time.sleep(0.02)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        assert not (b.root / "big.bin").exists() and held >= size // 2
        out = b.sync(address)
    received = summary_number(out, "chunk bytes received")
    assert received <= size - size // 2 + 4 * 1024 * 1024, out
    assert (b.root / "big.bin").read_bytes() == expected
    assert not [p for p in b.root.iterdir() if is_temp_name(p.name)]


class _Unprivileged(Device):
    """A device whose commands run as uid/gid 65534 when the tests run as root."""

    def command(self, *args: str) -> list[str]:
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        return (drop if os.geteuid() == 0 else []) + super().command(*args)


def test_files_inside_a_read_only_directory_are_written_and_its_mode_kept(
    tmp_path: Path,
) -> None:
    """As a non-root user, files inside a 0555 directory never arrived (errors 1 on
    every sync)."""
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("needs setpriv to drop root")
    base = Path(tempfile.mkdtemp(prefix="backer-ro-"))  # outside root's private tmp
    try:
        a, b = _Unprivileged(base, "a"), _Unprivileged(base, "b")
        (a.root / "ro" / "sub").mkdir(parents=True)
        (a.root / "ro" / "kept.txt").write_text("first")
        (a.root / "ro" / "gone.txt").write_text("bye")
        (a.root / "ro" / "sub" / "deep.txt").write_text("deep")
        if os.geteuid() == 0:
            os.chown(base, 65534, 65534)
            for path in [a.root, *a.root.rglob("*")]:
                os.chown(path, 65534, 65534)
        (a.root / "ro" / "sub").chmod(0o555)
        (a.root / "ro").chmod(0o555)
        port = _joined(a, b)
        assert snapshot(b.root) == snapshot(a.root)
        assert (b.root / "ro").stat().st_mode & 0o777 == 0o555
        (a.root / "ro").chmod(0o755)
        (a.root / "ro" / "kept.txt").write_text("second")
        (a.root / "ro" / "gone.txt").unlink()
        (a.root / "ro" / "new.txt").write_text("new")
        (a.root / "ro").chmod(0o555)
        with a.serving(port) as address:
            out = b.sync(address)
        assert "errors 0" in out, out
        assert snapshot(b.root) == snapshot(a.root)
        assert (b.root / "ro").stat().st_mode & 0o777 == 0o555
        assert (b.root / "ro" / "sub").stat().st_mode & 0o777 == 0o555
    finally:
        for path in base.rglob("*"):
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(base)


def test_R25_a_full_disk_says_what_kept_versions_hold_and_prune_all_frees_it(
    tmp_path: Path,
) -> None:
    """Deleting a file frees nothing for keep-all (its content is kept as a version): the
    disk-full error says how much kept versions hold and which command frees it now."""
    a, b = _founder(tmp_path)
    (a.root / "ten.bin").write_bytes(os.urandom(10 * 1024 * 1024))
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with small_disk(tmp_path / "disk", "30m") as disk, a.serving(port) as address:
        b.root = disk / "b"
        b.run("join", token, str(b.root))
        (b.root / "filler.bin").write_bytes(os.urandom(12 * 1024 * 1024))
        b.run("scan", "--dir", str(b.root))
        (b.root / "filler.bin").unlink()
        b.run("scan", "--dir", str(b.root))  # the filler's content is a kept version now
        (a.root / "ten.bin").write_bytes(os.urandom(10 * 1024 * 1024))
        a.run("scan", "--dir", str(a.root))
        result = b.run("sync", address, "--dir", str(b.root), check=False)
        assert result.returncode == 1, result
        error = result.stderr.strip().splitlines()[-1]
        assert error.startswith("backer: error: disk full: "), error
        assert "kept versions of replaced and deleted files hold 12 MB" in error, error
        assert "'backer prune --all' frees it now" in error, error
        pruned = b.run("prune", "--all", "--dir", str(b.root)).stdout
        assert pruned.startswith("freed 1258"), pruned  # the filler's 12 MiB
        b.sync(address)
        assert snapshot(b.root) == snapshot(a.root)


def fill_all_but(filler: Path, spare: int) -> None:
    """Take every free block of ``filler``'s disk but ``spare`` bytes, while a node
    writes there too: a megabyte at a time, then less once one does not fit (one
    allocation of all that statvfs said was free failed as the node's writes took some
    first, five times in a row under load), then give ``spare`` back."""
    size, step = 0, 1 << 20
    with open(filler, "wb") as handle:
        while step >= 4096:  # (each success takes a block of a finite disk: bounded)
            try:
                os.posix_fallocate(handle.fileno(), size, step)
                size += step
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                step //= 2
        os.ftruncate(handle.fileno(), max(size - spare, 0))


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_R32_a_disk_filled_while_a_window_receives_is_warned_of_listed_and_retried(
    tmp_path: Path,
) -> None:
    """The disk fills while the node writes a received file (its writes slowed so that
    it surely does): one disk-full warning, the file listed as left out in status, and
    once room is freed the file arrives with no new event to prompt it."""
    a, b = _founder(tmp_path)
    (a.root / "small.txt").write_text("small")
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with small_disk(tmp_path / "disk", "80m") as disk:
        with a.serving(port):
            b.root = disk / "b"
            b.run("join", token, str(b.root))
        a.start(port)
        filler = b.root / ".backer" / "filler"  # (no event: .backer is not shared)
        try:
            node_b = b.start(BACKER_TIME_SCALE="0.25")
            with slowed(node_b, "pwrite64", 20_000):
                (a.root / "r40.bin").write_bytes(os.urandom(40 * 1024 * 1024))
                deadline = time.monotonic() + 60
                while not any(is_temp_name(p.name) for p in b.root.iterdir()):
                    assert time.monotonic() < deadline, node_b.log
                    time.sleep(0.02)
                fill_all_but(filler, 256 * 1024)
                node_b.wait_for("disk full: ", timeout=60)
                status = b.run("status", "--json", "--dir", str(b.root)).stdout
                assert f'"path": "r40.bin",\n      "reason": "{LEFT_OUT}"' in status, status
            filler.unlink()
            deadline = time.monotonic() + 120
            while snapshot(b.root) != snapshot(a.root):
                assert time.monotonic() < deadline, node_b.log
                time.sleep(0.2)
        finally:
            for node in [*a.nodes, *b.nodes]:
                node.stop()


def test_a_folder_replaced_by_a_file_again_is_a_file_after_one_sync(tmp_path: Path) -> None:
    """A file that became a folder (with a file in it) and then a file again: the
    receiver's window wrote the file first, found the folder it replaces not yet empty
    (its file's deletion comes in the window after the writes) and kept the folder as a
    local edit, and nothing planned again: the peer kept an empty folder where the file
    is, until some later change or a restart. Now a plan whose deletions may have emptied
    such a folder is made again, and the file goes in its place in the same sync."""
    a, b = _founder(tmp_path)
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    spot = a.root / "spot"
    spot.write_text("a file\n")
    with a.serving(port) as address:
        b.run("join", token, str(b.root))
        spot.unlink()
        spot.mkdir()
        (spot / "inner.txt").write_text("in the folder\n")
        a.run("scan", "--dir", str(a.root))
        b.sync(address)
        assert (b.root / "spot" / "inner.txt").read_text() == "in the folder\n"
        shutil.rmtree(spot)
        spot.write_text("a file again\n")
        a.run("scan", "--dir", str(a.root))
        b.sync(address)
    assert snapshot(b.root) == snapshot(a.root)
    assert (b.root / "spot").read_text() == "a file again\n"
