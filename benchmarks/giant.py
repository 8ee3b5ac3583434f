"""One giant file between two devices: a sparse file (holes, and random regions in it)
made on ``a``, then ``backer join`` from an empty ``b`` with the real CLI over TCP on
127.0.0.1, the way any share starts.

    python -m benchmarks.giant [--gib 50] [--regions 64] [--region-mib 4] [--seed 1]
                               [--workdir DIR] [--reply-bytes N]

Prints the time to record the file on ``a`` (``init``: every byte is read and hashed,
holes included) and to join, the bytes on the wire, and the peak RSS of ``a``'s
``serve``, of the join and of ``init``. The copy is compared with the original extent by
extent (holes read as zeros), and ``b``'s file must stay sparse: all-zero chunks are
neither fetched nor written. Holes cost no disk space, so ``--workdir`` needs room for
the random regions twice (checked first). Every process is stopped by its PID and the
work directory removed at the end, also on an error or Ctrl-C.

``--reply-bytes`` runs backer with ``session.REPLY_BYTES`` lowered, so that a file a
test can afford has a manifest that travels in ``ManifestPart``s as a giant one's does
(50 GiB: ~205,000 chunks, a 7.2 MB manifest; a part is at most 4 MiB).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from backer.model.share import DB_FILE

from .measure import MIB, Processes, run_measured
from .tools import Backer

GIB = 1024 * MIB
NAME = "giant.bin"
_BLOCK = MIB  # comparison granularity: aligned blocks, so extents may differ in layout


def make_sparse(path: Path, size: int, regions: int, region_bytes: int, seed: int) -> int:
    """A ``size``-byte file of holes with ``regions`` random regions at seeded offsets
    (4 KiB aligned, possibly overlapping), last modified an hour ago like a file that
    has been there a while: one written within 2 s of a scan is re-hashed by the next,
    and ``serve`` scans in its event loop when a peer connects (a 50 GiB re-hash there
    outlasts the joiner's 60 s silence deadline). Returns the bytes written."""
    rng = random.Random(seed)
    with open(path, "wb") as handle:
        handle.truncate(size)
        for _ in range(regions):
            handle.seek(rng.randrange(0, size - region_bytes) // 4096 * 4096)
            handle.write(rng.randbytes(region_bytes))
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))
    return regions * region_bytes


def sparse_digest(path: Path) -> str:
    """SHA-256 over the size and every non-zero aligned block with its offset: equal for
    equal contents however the two files' holes fall, reading only their data extents."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(size.to_bytes(8, "big"))
    zero = bytes(_BLOCK)
    fd = os.open(path, os.O_RDONLY)
    try:
        position = 0
        while position < size:
            try:
                start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            block = start // _BLOCK * _BLOCK
            while block < end:
                data = os.pread(fd, _BLOCK, block)
                if data != zero[: len(data)]:
                    digest.update(block.to_bytes(8, "big") + data)
                block += _BLOCK
            position = block
    finally:
        os.close(fd)
    return digest.hexdigest()


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


class _Backer(Backer):
    """The benchmarks' backer driver, optionally with a lowered ``REPLY_BYTES``."""

    def __init__(self, *args: object, reply_bytes: int | None = None) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.reply_bytes = reply_bytes

    @property
    def _command(self) -> list[str]:
        if self.reply_bytes is None:
            return [sys.executable, "-m", "backer"]
        code = (
            "import runpy, sys, backer.protocol.session as s; "
            "s.REPLY_BYTES = int(sys.argv.pop(1)); "
            "runpy.run_module('backer', run_name='__main__')"
        )
        return [sys.executable, "-c", code, str(self.reply_bytes)]


@dataclass
class Result:
    size: int
    data_bytes: int  # random regions written on a
    init_seconds: float
    join_seconds: float
    wire_bytes: int
    manifest_bytes: int
    rss_mib: dict[str, float]
    allocated_a: int
    allocated_b: int


def _manifest_bytes(root: Path) -> int:
    """The size of the largest manifest ``root``'s share recorded (the giant file's)."""
    connection = sqlite3.connect(root / ".backer" / DB_FILE)
    try:
        (size,) = connection.execute("SELECT max(length(body)) FROM manifests").fetchone()
    finally:
        connection.close()
    return size or 0


def run(
    work: Path,
    size: int,
    regions: int,
    region_bytes: int,
    seed: int = 1,
    reply_bytes: int | None = None,
) -> Result:
    """Make the file on ``work/a``, join ``work/b`` to it, check the copy; ``work`` is
    left for the caller to remove."""
    source, target = work / "a", work / "b"
    source.mkdir()
    data = make_sparse(source / NAME, size, regions, region_bytes, seed)
    processes = Processes()
    with processes.running():
        tool = _Backer(work, source, target, processes, reply_bytes=reply_bytes)
        tool.setup()  # init (every byte read and hashed), invite, serve
        seconds, rss, out, _ = run_measured(
            processes,
            [*tool._command, "join", tool.token, str(target)],
            tool._env("b"),
            serve=tool.serve.pid,
        )
    copy = target / NAME
    if copy.stat().st_size != size or sparse_digest(copy) != sparse_digest(source / NAME):
        raise RuntimeError(f"{copy} differs from the original")
    if allocated(copy) > allocated(source / NAME) + 64 * MIB:
        raise RuntimeError(f"{copy} is not sparse: {allocated(copy) >> 20} MiB allocated")
    return Result(
        size,
        data,
        tool.index_seconds,
        seconds,
        tool.wire_bytes(out),
        _manifest_bytes(source),
        {
            "a (serve)": rss["serve"],
            "a (serve, anonymous)": rss["serve (anonymous)"],
            "b (join)": rss["command"],
            "b (join, anonymous)": rss["command (anonymous)"],
            "a (init)": tool.index_rss["command"],
            "a (init, anonymous)": tool.index_rss["command (anonymous)"],
        },
        allocated(source / NAME),
        allocated(copy),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=50, help="file size in GiB")
    parser.add_argument("--regions", type=int, default=64, help="random regions in it")
    parser.add_argument("--region-mib", type=float, default=4, help="size of each region")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--reply-bytes", type=int, default=None)
    args = parser.parse_args()
    size, region = int(args.gib * GIB), int(args.region_mib * MIB)
    needed = 2 * args.regions * region + GIB  # both copies' data, databases, margin
    free = shutil.disk_usage(args.workdir).free
    if free < needed:
        sys.exit(f"{args.workdir}: {free >> 20} MiB free, {needed >> 20} MiB needed")
    print(f"load average {os.getloadavg()}, {os.cpu_count()} cores", flush=True)
    work = Path(tempfile.mkdtemp(prefix="backer-giant-", dir=args.workdir))
    try:
        result = run(work, size, args.regions, region, args.seed, args.reply_bytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"{result.size / GIB:g} GiB file, {result.data_bytes >> 20} MiB of it random "
        f"data in {args.regions} regions; manifest {result.manifest_bytes / MIB:.1f} MiB\n"
        f"init (record on a): {result.init_seconds:.1f} s; "
        f"join (b from a over TCP): {result.join_seconds:.1f} s\n"
        f"wire bytes: {result.wire_bytes:,}\n"
        "peak RSS: "
        + ", ".join(f"{name} {mib:.0f} MiB" for name, mib in result.rss_mib.items())
        + f"\nallocated on disk: a {result.allocated_a >> 20} MiB, "
        f"b {result.allocated_b >> 20} MiB"
    )


if __name__ == "__main__":
    main()
