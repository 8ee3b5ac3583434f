"""A file changed with no close the watcher hears of (cut by ``truncate(2)``, appended to
and kept open) still reaches the peers of a running node soon, not at the hourly scan;
a peer that asks for the bytes of such a file meanwhile gets the old or the new version,
each verified, never a mix."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from tests.e2e import Device, free_port, invite, joined_pair, wait_until

SCALE = "0.1"  # a file written and not closed is reported 1 s after its last write
WAIT_S = 30  # (the hourly scan, which alone saw these changes before, is far beyond)
BIG = 50 * 1024 * 1024


def digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def test_a_file_kept_open_or_cut_by_truncate_reaches_the_running_peer(tmp_path: Path) -> None:
    """On a, a log written, flushed and never closed (b gets each appended part), then a
    50 MiB file recorded on both cut with os.truncate (IN_MODIFY alone, no close): b
    ends byte-identical with the cut file."""
    a, b, ports = joined_pair(tmp_path)
    nodes = [a.start(ports[0], BACKER_TIME_SCALE=SCALE), b.start(ports[1], BACKER_TIME_SCALE=SCALE)]

    def arrives(name: str) -> None:
        there = digest(a.root / name)
        wait_until(lambda: digest(b.root / name) == there, nodes, WAIT_S)

    log = open(a.root / "kept.log", "ab")  # noqa: SIM115 (kept open on purpose)
    try:
        for part in (b"first line\n", b"second line, the file still open\n" * 1000):
            log.write(part)
            log.flush()
            arrives("kept.log")
        (a.root / "big.bin").write_bytes(os.urandom(BIG))
        arrives("big.bin")
        os.truncate(a.root / "big.bin", 3 * 1024 * 1024 + 17)
        arrives("big.bin")
    finally:
        log.close()
        for node in nodes:
            node.stop()


def test_a_peer_joining_while_a_recorded_file_was_cut_gets_a_verified_version(
    tmp_path: Path,
) -> None:
    """b joins from the running a just after a's recorded 50 MiB file was cut (a's
    node asked for its chunks finds them gone): b's file, if the join wrote it, is the
    old or the new version, and once b runs, both hold the cut file."""
    a = Device(tmp_path, "a")
    a.root.mkdir()
    old = os.urandom(BIG)
    (a.root / "big.bin").write_bytes(old)
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    b = Device(tmp_path, "b")
    node_a = a.start(port)
    nodes = [node_a]
    try:
        os.truncate(a.root / "big.bin", 1024 * 1024 + 5)
        cut = digest(a.root / "big.bin")
        b.run("join", token, str(b.root), check=False)
        assert digest(b.root / "big.bin") in (None, hashlib.sha256(old).hexdigest(), cut)
        nodes.append(b.start())
        wait_until(lambda: digest(b.root / "big.bin") == cut, nodes, WAIT_S)
        started = time.monotonic()
        while time.monotonic() - started < 1:  # (and stays so: nothing puts the old back)
            assert digest(b.root / "big.bin") == cut
            time.sleep(0.2)
    finally:
        for node in nodes:
            node.stop()
