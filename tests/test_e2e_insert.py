"""A shifted insert into large files while both nodes run: nodes killed in the middle
of it converge once restarted, nothing lost, no temp file left."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backer.scanner.ignore import is_temp_name
from tests.e2e import Device, free_port, invite, snapshot

WAIT_S = 120
SIZE = 72 * 1024 * 1024
FILES = 3


def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if is_temp_name(p.name)]


def _converged(a: Device, b: Device, timeout: float = WAIT_S) -> dict[str, tuple]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            views = snapshot(a.root), snapshot(b.root)
        except FileNotFoundError:  # a temp file renamed into place while listed
            views = ({}, {"": ()})
        if views[0] == views[1]:
            return views[0]
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {d.root.name}:\n{n.log}" for d in (a, b) for n in d.nodes)
            raise AssertionError(f"not converged after {timeout} s\n{logs[-20000:]}")
        time.sleep(0.1)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Device, Device]]:
    """a and b run, holding the same FILES large files."""
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    a.root.mkdir()
    for n in range(FILES):
        (a.root / f"large-{n}.bin").write_bytes(os.urandom(SIZE))
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    a.start(port)
    b.run("join", token, str(b.root))
    b.start()
    try:
        _converged(a, b)
        yield a, b
    finally:
        for device in (a, b):
            for node in list(device.nodes):
                node.stop()


def _insert(a: Device, staging: Path) -> dict[str, bytes]:
    """10 bytes inserted in the middle of each large file of a, the new versions
    written outside the share and renamed in at once (as the benchmark does)."""
    staging.mkdir()
    new = {}
    for n in range(FILES):
        name = f"large-{n}.bin"
        data = (a.root / name).read_bytes()
        new[name] = data[: SIZE // 2] + os.urandom(10) + data[SIZE // 2 :]
        (staging / name).write_bytes(new[name])
    for name in new:
        os.replace(staging / name, a.root / name)
    return new


def test_both_nodes_killed_mid_insert_converge_when_restarted_nothing_lost_no_temp(
    pair: tuple[Device, Device], tmp_path: Path
) -> None:
    a, b = pair
    new = _insert(a, tmp_path / "staging")
    deadline = time.monotonic() + WAIT_S
    while not _temps(b.root):  # b is writing the first file a pushed
        assert time.monotonic() < deadline, "b never started writing"
        time.sleep(0.005)
    port = int(a.nodes[0].address.rpartition(":")[2])
    a.nodes[0].stop(signal.SIGKILL)
    b.nodes[0].stop(signal.SIGKILL)
    a.start(port)  # (where b dials it)
    b.start()
    view = _converged(a, b)
    for name, data in new.items():
        assert view[name][1] == data
    assert not _temps(a.root) and not _temps(b.root)

