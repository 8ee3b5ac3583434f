"""Physical limits measured in the same run, so a reader sees how close each tool is:
cold read of the dataset, BLAKE3 and FastCDC throughput, loopback TCP throughput."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from blake3 import blake3

from backer.scanner.content import chunker

from .measure import MIB


def _evict(path: Path) -> None:
    """Drop one file from the page cache (clean pages only; no privileges needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cold_read(root: Path) -> float:
    """Bytes per second reading every file below ``root`` from disk, cache evicted."""
    files = [p for p in root.rglob("*") if p.is_file()]
    os.sync()
    for path in files:
        _evict(path)
    buffer = bytearray(4 * MIB)
    total, started = 0, time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                total += count
    return total / (time.perf_counter() - started)


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
