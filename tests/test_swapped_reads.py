"""A share file swapped for a fifo or a link between a look and a read (R59): anyone
writing in the share can do it, between a scan's walk and its hashing, between a scan
and a peer's request for the file's chunks, between the store's look and its copy.
Real files and fifos in a temp dir, real SQLite; every read is bounded by an alarm."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backer.model.records import Kind
from backer.scanner.chunks import ChunkStore
from backer.scanner.content import manifest_of_bytes
from backer.scanner.walk import Seen, read_stable
from backer.versioner.store import Store
from tests.helpers import make_devices

BOUND_S = 5


class _Waited(Exception):
    """The test's bound ran out while backer waited or read."""


@contextlib.contextmanager
def _bounded() -> Iterator[None]:
    """Interrupt the block after BOUND_S (a blocked open() or read() too)."""

    def waited(*_: Any) -> None:
        raise _Waited

    previous = signal.signal(signal.SIGALRM, waited)
    signal.setitimer(signal.ITIMER_REAL, BOUND_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _swap_for_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def test_R59_a_peers_request_for_a_file_swapped_for_a_fifo_is_answered_at_once(
    tmp_path: Path,
) -> None:
    """A peer's chunk request opened each file the index names, in the node's event
    loop: a file swapped for a fifo since the scan blocked that open, and every share,
    peer and command of the node with it, until something wrote to the fifo."""
    (a,) = make_devices(tmp_path, 1)
    path = a.root / "f.txt"
    path.write_bytes(b"recorded, then swapped")
    a.scan()
    chunk = manifest_of_bytes(b"recorded, then swapped").chunks[0].hash
    assert ChunkStore(a.root, a.catalog).read_many([chunk])
    _swap_for_fifo(path)
    with _bounded():
        found = ChunkStore(a.root, a.catalog).read_many([chunk])
        alone = ChunkStore(a.root, a.catalog).read(chunk)
    a.close()
    assert found == {} and alone is None


@pytest.mark.parametrize("swap", ["fifo", "link to /dev/zero"])
def test_R59_a_scan_reads_a_file_swapped_since_its_walk_as_it_is_now(
    tmp_path: Path, swap: str
) -> None:
    """The scan hashed what its walk found by opening the path, following a link and
    waiting on a fifo: swapped in between, a fifo blocked the scan for good, a link to
    /dev/zero read without end (into memory, for a small file). Either is now looked at
    again: the link recorded as a link, the fifo skipped."""
    path = tmp_path / "f.txt"
    path.write_bytes(b"as the walk found it")
    info = path.lstat()
    seen = Seen(
        "f.txt", str(path), Kind.FILE, info.st_size, info.st_mtime_ns, info.st_ino, info.st_mode
    )
    if swap == "fifo":
        _swap_for_fifo(path)
    else:
        path.unlink()
        path.symlink_to("/dev/zero")
    with _bounded():
        current, manifest, content, problem = read_stable(seen)
    assert manifest is None
    if swap == "fifo":
        assert problem is not None
    else:
        assert (current.kind, content, problem) == (Kind.SYMLINK, b"/dev/zero", None)


def test_R59_without_hard_links_a_file_swapped_for_a_fifo_before_its_copy_is_not_waited_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where hard links fail the store copies the file it looked at, and opened it by
    name, waiting on a fifo put there in between (the scan or window with it). The
    fifo is now opened at once and refused: it is not the file looked at."""
    (a,) = make_devices(tmp_path, 1)
    path = a.root / "f.txt"
    path.write_bytes(b"as hashed")
    looked = path.stat()

    def swapped_then_refused(*args: Any, **kwargs: Any) -> None:
        _swap_for_fifo(path)
        raise PermissionError(errno.EPERM, "Operation not permitted")  # (as on exFAT)

    monkeypatch.setattr(os, "link", swapped_then_refused)
    content = manifest_of_bytes(b"as hashed").id
    with _bounded(), pytest.raises(OSError) as refused:
        Store(a.root, a.catalog).keep("f.txt", content, 9, inode=looked.st_ino)
    assert refused.value.errno == errno.ESTALE, refused.value
    assert not Store(a.root, a.catalog).has(content)
    a.close()
