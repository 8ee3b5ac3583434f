"""Physical limits measured in the same run, so a reader sees how close each tool is:
cold read of the dataset (page cache dropped first), BLAKE3 and FastCDC throughput,
loopback TCP throughput."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from blake3 import blake3

from backer.scanner.content import chunker, manifest_of_file

from .measure import MIB

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
NOT_DROPPED = (
    "page cache NOT dropped (needs root): files evicted one by one with fadvise, "
    "which leaves pages still mapped or dirty — this 'cold' may be partly warm"
)


def _evict(path: Path) -> None:
    """Drop one file's clean, unmapped pages from the page cache (no privileges needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_page_cache(paths: Iterable[Path] = ()) -> bool:
    """Make the next reads come from the disk, so that a cold measurement is one: write
    back dirty pages and drop the whole page cache (``sync; echo 3 >
    /proc/sys/vm/drop_caches``, root only). True if done; otherwise ``paths`` are
    evicted with fadvise, which is not the same (see ``NOT_DROPPED``), and False."""
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
        return True
    except OSError:
        for path in paths:
            _evict(path)
        return False


def cold_read(root: Path) -> tuple[float, bool]:
    """Bytes per second reading every file below ``root`` from disk, and whether the
    page cache could be dropped first (see :func:`drop_page_cache`)."""
    files = [p for p in root.rglob("*") if p.is_file()]
    dropped = drop_page_cache(files)
    buffer = bytearray(4 * MIB)
    total, started = 0, time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                total += count
    return total / (time.perf_counter() - started), dropped


def blake3_rate(size: int = 256 * MIB) -> float:
    data = os.urandom(size)
    started = time.perf_counter()
    blake3(data).digest()
    return size / (time.perf_counter() - started)


def chunking_rate(size: int = 256 * MIB) -> float:
    """FastCDC with backer's parameters, boundaries only."""
    data = os.urandom(size)
    started = time.perf_counter()
    for _ in chunker().cut_buf(data):
        pass
    return size / (time.perf_counter() - started)


def loopback_rate(size: int = 2048 * MIB) -> float:
    """One TCP connection on 127.0.0.1, 1 MiB writes, the reader in another thread."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    received = 0

    def read() -> None:
        nonlocal received
        connection, _ = server.accept()
        buffer = bytearray(MIB)
        with connection:
            while count := connection.recv_into(buffer):
                received += count

    reader = threading.Thread(target=read)
    reader.start()
    block = os.urandom(MIB)
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sender:
        for _ in range(size // MIB):
            sender.sendall(block)
    reader.join()
    server.close()
    return received / (time.perf_counter() - started)


def durable_rewrite(files: Iterable[Path], threads: int = 2) -> float:
    """Seconds to write a copy of each file durably, as a receiver must before it
    renames one in: a temp file beside it from the page-cached original, one 1 MiB
    piece at a time, fsync'd, then renamed over the original (the disk's floor for
    replacing those files; rsync writes without the fsync). ``threads`` files at once,
    as backer's copier writes them (two streams kept this disk busier than one)."""

    def rewrite(path: Path) -> None:
        buffer = bytearray(MIB)
        temp = path.with_name(path.name + ".durable")
        with open(path, "rb", buffering=0) as source, open(temp, "wb", buffering=0) as copy:
            while count := source.readinto(buffer):
                copy.write(memoryview(buffer)[:count])
            os.fsync(copy.fileno())
        os.replace(temp, path)

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(rewrite, files))
    return time.perf_counter() - started


def manifest_seconds(path: Path) -> float:
    """Seconds backer takes to chunk and hash one page-cached file (what a sender needs
    before it can say what changed)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:  # (page-cached, as the file just written is)
        while handle.read(4 * MIB):
            pass
    started = time.perf_counter()
    manifest_of_file(path, size)
    return time.perf_counter() - started
