"""File contents as content-defined chunks addressed by BLAKE3.

FastCDC cuts a file where its content says so, so an insert changes only the chunks
around it and everything after it still matches. Sizes (see docs/decisions.md): min
16 KiB, average 64 KiB (FastCDC's mean comes out near avg + min, about 80 KiB), max
256 KiB. A file's manifest lists its chunks as (BLAKE3 hash, length); the file's
content id is the BLAKE3 hash of its manifest, so identical contents share one id.

Hashing large files is pipelined and bounded: one thread reads a window of the file
into a reused buffer and cuts it (pyfastcdc releases the GIL) while another hashes the
chunks of the previous window (BLAKE3 releases it too).
"""

from __future__ import annotations

import contextlib
import os
import queue
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

from blake3 import blake3
from pyfastcdc import FastCDC

from backer.fs.dirs import open_regular

MIN_CHUNK = 16 * 1024
AVG_CHUNK = 64 * 1024
MAX_CHUNK = 256 * 1024
PIPELINE_FROM = 4 * 1024 * 1024
_WINDOW = 4 * 1024 * 1024  # read and cut this much at a time
_WINDOWS = 3  # buffers per file: one being cut, the others being hashed
_ENTRY = struct.Struct(">32sI")

_hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backer-hash")


def chunker() -> FastCDC:
    """A fresh chunker (FastCDC objects must not be shared between threads)."""
    return FastCDC(AVG_CHUNK, min_size=MIN_CHUNK, max_size=MAX_CHUNK)


class ChunkRef(NamedTuple):
    hash: bytes
    offset: int
    length: int


@dataclass(frozen=True)
class Manifest:
    """The chunk list of one file's contents."""

    chunks: tuple[ChunkRef, ...]

    @property
    def size(self) -> int:
        return sum(c.length for c in self.chunks)

    @cached_property
    def encoded(self) -> bytes:
        return b"".join(_ENTRY.pack(c.hash, c.length) for c in self.chunks)

    @cached_property
    def id(self) -> bytes:
        """The content id: BLAKE3 of the encoded chunk list."""
        return blake3(self.encoded).digest()

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        if len(data) % _ENTRY.size:
            raise BadManifest("manifest size is not a whole number of entries")
        chunks, offset = [], 0
        for digest, length in _ENTRY.iter_unpack(data):
            chunks.append(ChunkRef(digest, offset, length))
            offset += length
        return cls(tuple(chunks))


class BadManifest(ValueError):
    """A manifest that no honest chunking makes, or that does not add up to its file."""


def check_manifest(manifest: Manifest, size: int | None = None) -> Manifest:
    """``manifest`` if its chunks are what FastCDC cuts — every chunk but the last within
    [MIN_CHUNK, MAX_CHUNK], the last within [1, MAX_CHUNK], offsets contiguous — and,
    given the version's declared ``size``, if they add up to it exactly.

    A received manifest is a promise about sizes: unchecked, a few hundred KiB on the
    wire could declare a file of any size (or a declared size could come with no
    content at all, leaving a sparse giant)."""
    chunks = manifest.chunks
    if size is not None and len(chunks) > size // MIN_CHUNK + 1:
        raise BadManifest(f"{len(chunks)} chunks for {size} bytes")
    offset = 0
    for index, ref in enumerate(chunks):
        shortest = 1 if index == len(chunks) - 1 else MIN_CHUNK
        if not shortest <= ref.length <= MAX_CHUNK:
            raise BadManifest(f"chunk {index} of {ref.length} bytes")
        if ref.offset != offset:
            raise BadManifest(f"chunk {index} is not where the previous one ends")
        offset += ref.length
    if size is not None and offset != size:
        raise BadManifest(f"chunks add up to {offset} bytes, the version declares {size}")
    return manifest


def _hash_views(views: list[tuple[int, memoryview]]) -> list[ChunkRef]:
    return [ChunkRef(blake3(view).digest(), offset, len(view)) for offset, view in views]


def _hash_window(
    views: list[tuple[int, memoryview]], free: queue.SimpleQueue[bytearray], buffer: bytearray
) -> list[ChunkRef]:
    """Hash one window's chunks, then hand its buffer back for reuse."""
    try:
        return _hash_views(views)
    finally:
        views.clear()  # (no view may outlive its buffer's next fill)
        free.put(buffer)


def _fill(fd: int, buffer: bytearray, start: int) -> int:
    """Read into ``buffer[start:]`` until it is full or the file ends; the bytes held."""
    view = memoryview(buffer)
    while start < len(buffer):
        count = os.readv(fd, [view[start:]])
        if not count:
            break
        start += count
    return start


def _windowed(path: str | os.PathLike[str], directory: int | None = None) -> list[ChunkRef]:
    """Chunk and hash a file a window at a time, read into a few reused buffers.

    FastCDC decides each cut from at most MAX_CHUNK bytes after the chunk's start, so
    chunks are cut in a window only while MAX_CHUNK bytes (or the end of the file)
    follow; the rest is carried into the next window: the same chunks as cutting the
    whole file at once (tested), in bounded memory (mapping whole files for chunking
    held hundreds of MiB while large files were rescanned). One thread cuts (pyfastcdc
    releases the GIL) while the hash thread hashes the previous window (BLAKE3 too)."""
    free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    for _ in range(_WINDOWS):
        free.put(bytearray(_WINDOW))
    pending: list[Future[list[ChunkRef]]] = []
    cutter = chunker()
    fd = open_regular(path, directory)
    try:
        if hasattr(os, "posix_fadvise"):  # (not on macOS) a larger read-ahead
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        base, carried, tail = 0, 0, b""
        while True:
            buffer = free.get()
            buffer[:carried] = tail
            held = _fill(fd, buffer, carried)
            end = held < len(buffer)
            views: list[tuple[int, memoryview]] = []
            cut = 0
            for chunk in cutter.cut_buf(memoryview(buffer)[:held]):
                if not end and held - chunk.offset < MAX_CHUNK:
                    break
                views.append((base + chunk.offset, chunk.data))
                cut = chunk.offset + chunk.length
            tail, carried, base = bytes(buffer[cut:held]), held - cut, base + cut
            pending.append(_hasher.submit(_hash_window, views, free, buffer))
            if end:
                break
    finally:
        os.close(fd)
    return [ref for future in pending for ref in future.result()]


def manifest_of_bytes(data: bytes) -> Manifest:
    """Chunk and hash an in-memory buffer (small files, tests)."""
    views = [(c.offset, c.data) for c in chunker().cut_buf(data)] if data else []
    return Manifest(tuple(_hash_views(views)))


def manifest_of_file(
    path: str | os.PathLike[str], size: int, directory: int | None = None
) -> Manifest:
    """Chunk and hash a file (``path`` relative to the descriptor ``directory`` if
    given); ``size`` (from a stat just before) picks the strategy. A small file is read
    whole, but never past ``size + 1`` bytes: one still being written can be far larger
    by the time it is read (a 256 MiB file stat'd as it was created took 256 MiB of
    memory at once); one byte more than the stat said is enough to make its manifest
    match no content of ``size`` bytes, and the caller's stat after the read sees the
    change."""
    if size < PIPELINE_FROM:
        with os.fdopen(open_regular(path, directory), "rb") as handle:
            return manifest_of_bytes(handle.read(size + 1))
    return Manifest(tuple(_windowed(path, directory)))
