"""File contents as content-defined chunks addressed by BLAKE3.

FastCDC cuts a file where its content says so, so an insert changes only the chunks
around it and everything after it still matches. Sizes (see docs/decisions.md): min
16 KiB, average 64 KiB (FastCDC's mean comes out near avg + min, about 80 KiB), max
256 KiB. A file's manifest lists its chunks as (BLAKE3 hash, length); the file's
content id is the BLAKE3 hash of its manifest, so identical contents share one id.

Hashing large files is pipelined: one thread cuts (pyfastcdc releases the GIL) while
another hashes the chunks already cut (BLAKE3 releases it too), and a third reads
ahead so that a cold file streams from disk.
"""

from __future__ import annotations

import os
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

from blake3 import blake3
from pyfastcdc import FastCDC

MIN_CHUNK = 16 * 1024
AVG_CHUNK = 64 * 1024
MAX_CHUNK = 256 * 1024
PIPELINE_FROM = 4 * 1024 * 1024
_BATCH = 64
_READ_AHEAD = 256 * 1024 * 1024
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


class _ReadAhead:
    """Reads a file into the page cache a bounded distance ahead of the chunker.

    The chunker reads through mmap, whose page faults on a cold file come in far below
    the disk's sequential speed; plain large reads in a helper thread (I/O releases the
    GIL) keep the disk streaming. It stays at most ``_READ_AHEAD`` bytes ahead so that a
    file larger than memory is not read twice.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path
        self.position = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="backer-readahead", daemon=True)

    def _run(self) -> None:
        buffer = bytearray(8 * 1024 * 1024)
        read = 0
        with open(self.path, "rb", buffering=0) as handle:
            while not self._done.is_set():
                if read - self.position > _READ_AHEAD:
                    self._done.wait(0.005)
                    continue
                count = handle.readinto(buffer)
                if not count:
                    return
                read += count

    def __enter__(self) -> _ReadAhead:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def manifest_of_bytes(data: bytes) -> Manifest:
    """Chunk and hash an in-memory buffer (small files, tests)."""
    views = [(c.offset, c.data) for c in chunker().cut_buf(data)] if data else []
    return Manifest(tuple(_hash_views(views)))


def manifest_of_file(path: str | os.PathLike[str], size: int) -> Manifest:
    """Chunk and hash a file; ``size`` (from a stat just before) picks the strategy."""
    if size < PIPELINE_FROM:
        with open(path, "rb") as handle:
            return manifest_of_bytes(handle.read())
    pending: list[Future[list[ChunkRef]]] = []
    batch: list[tuple[int, memoryview]] = []
    with _ReadAhead(path) as read_ahead:
        for chunk in chunker().cut_file(os.fspath(path)):
            read_ahead.position = chunk.offset
            batch.append((chunk.offset, chunk.data))
            if len(batch) == _BATCH:
                pending.append(_hasher.submit(_hash_views, batch))
                batch = []
    refs = [ref for future in pending for ref in future.result()] + _hash_views(batch)
    return Manifest(tuple(refs))
