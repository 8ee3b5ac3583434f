"""Where chunk bytes come from: the files already in the share.

The catalog's chunk index says where a chunk's bytes were last seen (any file of the
share, kept contents in ``.backer/store/`` included); they are re-hashed when read, so
a stale index row costs a miss, never a wrong byte, and a file of the share found
changed so is named to ``on_stale`` (the running node scans it). Chunks from peers do not pass
through here: they are written straight into the temp files being assembled (see
:class:`~backer.model.materializer.Assembly`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from blake3 import blake3

from backer.buffers import POOLED_FROM, Buffers
from backer.db.catalog import Catalog
from backer.fs.dirs import open_regular
from backer.fs.paths import METADATA_DIR
from backer.scanner.content import ChunkRef, Manifest

COPY_PIECE = 1024 * 1024  # copied (and hashed) this much at a time, through one buffer
READ_RUN = 4 * 1024 * 1024  # a peer's chunks lying back to back are read this much at a time
READS_KEPT = 3  # buffers of READ_RUN bytes kept for a peer's reads: a request being sent,
# the one read ahead of it, and the one whose chunks the next flush still encrypts
SYNC_FILE_RANGE_WRITE = 2  # (linux/fs.h)
_sync_file_range = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


class CopyStopped(Exception):
    """A local copy was told to stop (the window is given up: the process stops)."""


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``length`` dirty bytes at ``offset`` (0: to the end) to disk without
    waiting for them (Linux ``sync_file_range``; elsewhere nothing): the fsync before
    the rename then finds them mostly written. It may block while the disk queue is
    full, so it is only called off the event loop. No durability step (the fsync is)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


class Run(NamedTuple):
    """Chunks that follow one another both in a local file and in the file assembled."""

    source: str  # a path of the share (or under .backer/versions)
    offset: int  # where the first chunk starts in ``source``
    chunks: list[ChunkRef]  # at their offsets in the file assembled, contiguous

    @property
    def start(self) -> int:
        return self.chunks[0].offset


class ChunkStore:
    def __init__(self, root: Path, catalog: Catalog) -> None:
        self.root = root
        self.catalog = catalog
        self._reads = Buffers(keep=READS_KEPT, size=READ_RUN)  # for :meth:`read_many`
        self.on_stale: Callable[[str], None] | None = None  # told each file of the share
        # whose indexed bytes a read found changed: written with no event the watcher
        # listens to (kept open, truncate(2)), so its running node scans it now

    def stale(self, path: str) -> None:
        """Have the running node scan ``path``, a file of the share found not to hold
        the bytes its scan cache says (none without a node: its next scan does)."""
        if self.on_stale is not None and path.partition("/")[0] != METADATA_DIR:
            self.on_stale(path)

    def _open(self, path: str) -> int | None:
        try:
            return open_regular(self.root / path)  # never via a link, never a fifo's wait
        except OSError:
            return None

    def read(self, chunk_hash: bytes) -> bytes | None:
        """The verified bytes of a chunk from any local file that still holds it."""
        return self._read_from(chunk_hash, self.catalog.chunk_locations(chunk_hash))

    def _read_from(self, chunk_hash: bytes, places: Iterable[tuple[str, int, int]]) -> bytes | None:
        """The first of ``places`` that still holds the chunk's bytes (re-hashed)."""
        for path, offset, length in places:
            fd = self._open(path)
            if fd is None:
                continue
            try:
                data = os.pread(fd, length, offset)
            except OSError:
                continue
            finally:
                os.close(fd)
            if blake3(data).digest() == chunk_hash:
                return data
            self.stale(path)
        return None

    def read_many(self, hashes: Sequence[bytes]) -> dict[bytes, bytes | memoryview]:
        """The verified bytes of those of ``hashes`` that local files still hold, for a
        peer's request: one index query for all of them, each file opened once, and each
        run of chunks that lie back to back in it read with one ``pread`` into one
        buffer (the chunks are views of it, sent without another copy). Every chunk is
        re-hashed before it is returned: a file changed since it was indexed costs a
        miss here (its other places are then tried one by one), never bytes sent under a
        hash they do not have (the receiver would close the session on them)."""
        locations = self.catalog.chunk_locations_of(hashes)
        by_path: dict[str, list[tuple[int, int, bytes]]] = {}
        for chunk_hash in dict.fromkeys(hashes):
            places = locations.get(chunk_hash)
            if places:
                path, offset, length = places[0]
                by_path.setdefault(path, []).append((offset, length, chunk_hash))
        found: dict[bytes, bytes | memoryview] = {}
        for path, wanted in by_path.items():
            fd = self._open(path)
            if fd is None:
                continue
            try:
                for run in _back_to_back(sorted(wanted)):
                    start = run[0][0]
                    try:
                        held = self._read_run(fd, start, run[-1][0] + run[-1][1] - start)
                    except OSError:
                        break
                    for offset, length, chunk_hash in run:
                        data = held[offset - start : offset - start + length]
                        if len(data) == length and blake3(data).digest() == chunk_hash:
                            found[chunk_hash] = data
                        else:
                            self.stale(path)
            finally:
                os.close(fd)
        for chunk_hash, places in locations.items():
            if chunk_hash not in found:
                data = self._read_from(chunk_hash, places[1:])
                if data is not None:
                    found[chunk_hash] = data
        return found

    def _read_run(self, fd: int, start: int, size: int) -> memoryview:
        """``size`` bytes of ``fd`` at ``start`` (fewer at its end). A run of a bulk
        transfer is read into a reused buffer (a new one per run cost its page faults:
        ~5 % of a serving node's CPU); a small one into a new ``bytes`` (small files:
        no pooled buffer is held by a few KiB of them while they wait to be sent)."""
        if size < POOLED_FROM:
            return memoryview(os.pread(fd, size, start))
        held = self._reads.take(size)
        return held[: os.preadv(fd, [held], start)]

    def locate(
        self,
        refs: Sequence[ChunkRef],
        replaced: tuple[str, Manifest] | None = None,
        indexed: dict[bytes, list[tuple[str, int, int]]] | None = None,
    ) -> list[Run]:
        """Where the chunks ``refs`` of a file (in offset order) can be copied from, as
        runs: after a 10-byte insert a 256 MiB file is two or three runs of its old
        version, not thousands of chunks. Chunks found nowhere are in no run.

        ``replaced`` is the file being replaced (its path and the manifest its last scan
        recorded): the chunks it holds are taken from it without asking the index, which
        holds them there too and, for each, in every kept version (a query per 500
        chunks and a row per place: 0.15-0.6 s per 256 MiB file). A stale manifest
        costs what a stale index row costs: the copy's check fails, the chunk is looked
        for elsewhere.

        ``indexed``: what the index says of these chunks, looked up already for many
        files at once (:meth:`Catalog.chunk_locations_of`; a window of small new files
        made one query per file), taken instead of asking it again."""
        held: dict[bytes, list[tuple[str, int, int]]] = {}
        if replaced is not None:
            path, manifest = replaced
            for ref in manifest.chunks:
                held.setdefault(ref.hash, []).append((path, ref.offset, ref.length))
        if indexed is None:
            elsewhere = (ref.hash for ref in refs if ref.hash not in held)
            indexed = self.catalog.chunk_locations_of(elsewhere)
        locations = {**indexed, **held} if held else indexed
        runs: list[Run] = []
        for ref in refs:
            places = [p for p in locations.get(ref.hash, ()) if p[2] == ref.length]
            if not places:
                continue
            if runs:
                last = runs[-1]
                end = last.chunks[-1].offset + last.chunks[-1].length
                following = (last.source, last.offset + end - last.start, ref.length)
                if ref.offset == end and following in places:
                    last.chunks.append(ref)
                    continue
            path, offset, _ = places[0]
            runs.append(Run(path, offset, [ref]))
        return runs

    def copy(self, fd: int, runs: list[Run], stop: threading.Event) -> set[int]:
        """Copy ``runs`` into the file ``fd``, checking every chunk against its hash as it
        passes through: the offsets of the chunks written with verified bytes. One read
        and one write per byte, a piece at a time through one reused buffer (on ext4 this
        beats ``os.copy_file_range``, see docs/decisions.md). The bytes written are the
        very bytes hashed, so a chunk whose source changed since it was indexed (even
        while it is being copied) fails its check and is not returned: it must come from
        elsewhere, and the final verification re-reads whatever was not returned. A write
        error (a full disk) is raised; an unreadable source only costs its chunks.

        Runs in a worker thread (reads, writes and BLAKE3 release the GIL): each piece's
        writeback is started at once (:func:`start_writeback`), and ``stop``, once set,
        ends the copy between two pieces with :class:`CopyStopped`."""
        buffer = memoryview(bytearray(COPY_PIECE))
        verified: set[int] = set()
        for run in runs:
            source = self._open(run.source)
            if source is None:
                continue
            try:
                for piece in _pieces(run.chunks):
                    if stop.is_set():
                        raise CopyStopped
                    base = piece[0].offset
                    size = piece[-1].offset + piece[-1].length - base
                    try:
                        count = os.preadv(source, [buffer[:size]], run.offset + base - run.start)
                    except OSError:
                        break
                    held = buffer[:count]
                    good = [ref for ref in piece if _matches(held, ref.offset - base, ref)]
                    write_all(fd, held, base)
                    start_writeback(fd, base, count)
                    verified.update(ref.offset for ref in good)
                    if count < size:  # the source is shorter than it was
                        break
            finally:
                os.close(source)
        return verified


def _matches(held: memoryview, start: int, ref: ChunkRef) -> bool:
    """Whether ``held[start:]`` begins with the bytes of the chunk ``ref``."""
    data = held[start : start + ref.length]
    return len(data) == ref.length and blake3(data).digest() == ref.hash


def write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """``pwrite`` until every byte is written: a short write is continued, and the
    error that usually follows it (ENOSPC, EIO) is raised."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, "a write made no progress")
        view, offset = view[written:], offset + written


def _pieces(chunks: list[ChunkRef]) -> Iterator[list[ChunkRef]]:
    """Consecutive chunks grouped into pieces of at most COPY_PIECE bytes."""
    piece: list[ChunkRef] = []
    size = 0
    for ref in chunks:
        if piece and size + ref.length > COPY_PIECE:
            yield piece
            piece, size = [], 0
        piece.append(ref)
        size += ref.length
    if piece:
        yield piece


def _back_to_back(
    wanted: list[tuple[int, int, bytes]],
) -> Iterator[list[tuple[int, int, bytes]]]:
    """(offset, length, hash) in offset order, grouped into runs that follow one another
    in the file, each at most READ_RUN bytes (one chunk at least)."""
    run: list[tuple[int, int, bytes]] = []
    for item in wanted:
        if run and (item[0] != run[-1][0] + run[-1][1] or item[0] + item[1] - run[0][0] > READ_RUN):
            yield run
            run = []
        run.append(item)
    if run:
        yield run
