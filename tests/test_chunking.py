"""Content-defined chunking of files read a window at a time."""

from __future__ import annotations

import os
import random
import threading
import tracemalloc
from collections.abc import Iterable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backer.scanner import content
from backer.scanner.chunks import ChunkStore
from backer.scanner.content import MAX_CHUNK, manifest_of_bytes, manifest_of_file
from tests.helpers import make_devices


def _contents(seed: int, size: int, zeros: int) -> bytes:
    """Random bytes with a run of ``zeros`` zero bytes in the middle (FastCDC cuts zeros
    into MAX_CHUNK pieces: cuts that land exactly on a window's edge)."""
    rng = random.Random(seed)
    zeros = min(zeros, size)
    head = (size - zeros) // 2
    return rng.randbytes(head) + bytes(zeros) + rng.randbytes(size - zeros - head)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    window=st.integers(MAX_CHUNK, 3 * MAX_CHUNK),
    windows=st.integers(0, 3),
    shift=st.integers(-MAX_CHUNK, MAX_CHUNK),
    zeros=st.sampled_from([0, MAX_CHUNK - 1, MAX_CHUNK, 3 * MAX_CHUNK + 7]),
    seed=st.integers(0, 2**32),
)
def test_windowed_chunking_cuts_the_chunks_of_whole_file_chunking(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    window: int,
    windows: int,
    shift: int,
    zeros: int,
    seed: int,
) -> None:
    """Files whose size is near a multiple of the window (below, at, just above) get the
    very chunks that cutting the whole file in memory gives."""
    monkeypatch.setattr(content, "PIPELINE_FROM", 0)
    monkeypatch.setattr(content, "_WINDOW", window)
    size = max(0, windows * window + shift)
    data = _contents(seed, size, zeros)
    path = tmp_path / "file"
    path.write_bytes(data)
    assert manifest_of_file(path, size) == manifest_of_bytes(data)


def test_a_file_of_more_windows_than_buffers_gets_the_chunks_of_whole_file_chunking(
    tmp_path: Path,
) -> None:
    """A 40 MiB file (five real windows: each buffer is reused) is cut as a whole."""
    data = _contents(7, 40 * 1024 * 1024 + 12345, 5 * MAX_CHUNK)
    path = tmp_path / "file"
    path.write_bytes(data)
    assert manifest_of_file(path, len(data)) == manifest_of_bytes(data)


def test_a_file_grown_since_its_stat_is_read_only_past_the_size_it_had(tmp_path: Path) -> None:
    """A file stat'd small as it was created (a tool writing 256 MiB next to its target)
    was read whole, however large it had grown by then: a node rescanning a large
    profile's insert peaked at 383 MiB. It is read one byte past the stat's size, so its
    manifest matches no content of that size and the caller's second stat sees the
    change."""
    data = _contents(3, 48 * 1024 * 1024, 0)
    path = tmp_path / "growing"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        manifest = manifest_of_file(path, 100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert manifest.size == 101
    assert manifest != manifest_of_bytes(data[:100])
    assert peak < 1024 * 1024


def test_chunking_works_where_the_system_has_no_posix_fadvise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """macOS has no ``posix_fadvise``: asking for a larger read-ahead there raised
    AttributeError, and no large file could be scanned."""
    monkeypatch.delattr(os, "posix_fadvise")
    data = _contents(11, content.PIPELINE_FROM + 5, 0)
    path = tmp_path / "file"
    path.write_bytes(data)
    assert manifest_of_file(path, len(data)) == manifest_of_bytes(data)


def test_a_copied_run_whose_source_changed_since_it_was_indexed_yields_only_intact_chunks(
    tmp_path: Path,
) -> None:
    """Copied chunks are hashed on their way from the old file to the new one (no read
    back): bytes of the source that changed after its scan must not count as copied,
    and every chunk that does count holds exactly its bytes in the new file."""
    (share,) = make_devices(tmp_path, 1)
    data = _contents(3, 3 * 1024 * 1024, 0)
    (share.root / "old.bin").write_bytes(data)
    share.scan()
    manifest = manifest_of_bytes(data)
    changed = range(1536 * 1024, 1536 * 1024 + 100)
    with open(share.root / "old.bin", "r+b") as handle:  # not rescanned
        handle.seek(changed.start)
        handle.write(bytes(b ^ 0xFF for b in data[changed.start : changed.stop]))
    store = ChunkStore(share.root, share.catalog)
    runs = store.locate(manifest.chunks)
    assert sum(len(run.chunks) for run in runs) == len(manifest.chunks)
    fd = os.open(tmp_path / "new.bin", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        verified = store.copy(fd, runs, threading.Event())
        written = os.pread(fd, len(data), 0)
    finally:
        os.close(fd)
    hit = {
        r.offset
        for r in manifest.chunks
        if r.offset < changed.stop and changed.start < r.offset + r.length
    }
    assert hit and verified == {r.offset for r in manifest.chunks} - hit
    for ref in manifest.chunks:
        if ref.offset in verified:
            assert (
                written[ref.offset : ref.offset + ref.length]
                == data[ref.offset : ref.offset + ref.length]
            )


def test_the_replaced_files_chunks_are_located_in_it_without_asking_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that replaces a file takes the chunks the file's last scan recorded from
    the file itself: the index is asked only about the others (after a 10-byte insert,
    for a handful of chunks instead of thousands, each found in every kept version).
    A replaced file changed since its scan yields only its intact chunks, as a stale
    index row does."""
    (share,) = make_devices(tmp_path, 1)
    data = _contents(5, 3 * 1024 * 1024, 0)
    (share.root / "old.bin").write_bytes(data)
    (share.root / "other.bin").write_bytes(data[: 512 * 1024] + b"x" * 1000)
    share.scan()
    old = manifest_of_bytes(data)
    new_data = data[: 1024 * 1024] + b"0123456789" + data[1024 * 1024 :] + b"y" * 70_000
    new = manifest_of_bytes(new_data)
    asked: list[bytes] = []
    locations_of = share.catalog.chunk_locations_of

    def counted(hashes: Iterable[bytes]) -> dict[bytes, list[tuple[str, int, int]]]:
        hashes = list(hashes)
        asked.extend(hashes)
        return locations_of(hashes)

    monkeypatch.setattr(share.catalog, "chunk_locations_of", counted)
    store = ChunkStore(share.root, share.catalog)
    changed = range(2 * 1024 * 1024, 2 * 1024 * 1024 + 100)
    with open(share.root / "old.bin", "r+b") as handle:  # not rescanned
        handle.seek(changed.start)
        handle.write(bytes(b ^ 0xFF for b in data[changed.start : changed.stop]))
    runs = store.locate(new.chunks, ("old.bin", old))
    held = {ref.hash for ref in old.chunks}
    assert asked and not held.intersection(asked)
    assert {ref.hash for ref in new.chunks} - held == set(asked)
    assert {run.source for run in runs} == {"old.bin"} and len(runs) == 2
    fd = os.open(tmp_path / "new.bin", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        verified = store.copy(fd, runs, threading.Event())
        written = os.pread(fd, len(new_data), 0)
    finally:
        os.close(fd)
    copied = {ref for run in runs for ref in run.chunks}
    old_at = {ref.hash: ref.offset for ref in old.chunks}
    hit = {
        ref.offset
        for ref in copied
        if old_at[ref.hash] < changed.stop and changed.start < old_at[ref.hash] + ref.length
    }
    assert hit and verified == {ref.offset for ref in copied} - hit
    for ref in copied:
        if ref.offset in verified:
            piece = written[ref.offset : ref.offset + ref.length]
            assert piece == new_data[ref.offset : ref.offset + ref.length]
