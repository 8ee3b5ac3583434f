"""Scan-side benchmarks of backer's core engine, with rsync measured in the same run.

    python benchmarks/scan.py [--files 100000] [--big-mib 1024] [--workdir DIR]

Prints, on this machine:
- hash+chunk throughput of one large file, warm and cold page cache, next to a plain
  cold read of the same file (the physical limit) and rsync's checksum pass; "cold"
  means the whole page cache was dropped first (root), and the output says when it
  could not be;
- first scan of many small files (files/s) and a rescan of them unchanged (seconds),
  through the real CLI in a subprocess, next to an rsync stat walk of the same tree;
- catch-up verification rate of a received journal (events/s), with and without
  storing the events;
- resident memory per file of the CRDT state at 100k and 1M entries.

All data lives in a temporary directory that is removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nacl.signing
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backer.scanner.content import manifest_of_file  # noqa: E402
from benchmarks.limits import NOT_DROPPED, drop_page_cache  # noqa: E402
from journal import Event, Journal  # noqa: E402

MIB = 1024 * 1024


def row(label: str, value: str, note: str = "") -> None:
    print(f"{label:<44}{value:>22}  {note}")


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def read_all(path: Path) -> int:
    total = 0
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(4 * MIB)
        while count := handle.readinto(buffer):
            total += count
    return total


def run_child(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """Run a command; return (seconds, peak RSS in MiB sampled every 20 ms, stdout)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as out:
        child = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, text=True)
        watched = psutil.Process(child.pid)
        peak = 0
        while child.poll() is None:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, watched.memory_info().rss)
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        if child.returncode != 0:
            raise SystemExit(f"{args} failed with status {child.returncode}")
        out.seek(0)
        return seconds, peak / MIB, out.read()


def bench_big_file(work: Path, size_mib: int) -> None:
    path = work / "big.bin"
    with open(path, "wb") as handle:
        for _ in range(size_mib):
            handle.write(os.urandom(MIB))
    size = path.stat().st_size
    dropped = drop_page_cache([path])
    cold_read, _ = timed(read_all, path)
    dropped = drop_page_cache([path]) and dropped
    cold, _ = timed(manifest_of_file, path, size)
    warm = min(timed(manifest_of_file, path, size)[0] for _ in range(3))
    print(f"\n## Hash + chunk of one {size_mib} MiB file")
    print("cold: page cache dropped before each" if dropped else f"cold: {NOT_DROPPED}")
    row("plain cold read (the limit)", f"{size / cold_read / 1e9:.2f} GB/s")
    row("backer, cold cache", f"{size / cold / 1e9:.2f} GB/s", f"{cold_read / cold:.2f} x limit")
    row("backer, warm cache", f"{size / warm / 1e9:.2f} GB/s", "target >= 1 GB/s")
    if shutil.which("rsync"):
        copy = work / "copy"
        copy.mkdir()
        shutil.copy2(path, copy / "big.bin")
        rsync, _ = timed(
            subprocess.run, ["rsync", "-ac", "--dry-run", str(path), str(copy / "big.bin")]
        )
        # rsync -c reads and checksums both copies: per copy it spends rsync / 2
        ratio = warm / (rsync / 2)
        row(
            "rsync --checksum, warm, per copy",
            f"{size / (rsync / 2) / 1e9:.2f} GB/s",
            f"backer/rsync time {ratio:.2f}",
        )
        shutil.rmtree(copy)
    path.unlink()


def make_small_files(root: Path, count: int) -> int:
    total = 0
    per_dir = 1000
    payload = os.urandom(16 * 1024)
    old = time.time() - 3600
    for index in range(count):
        directory = root / f"d{index // per_dir:04d}"
        if index % per_dir == 0:
            directory.mkdir(parents=True)
        size = 1024 + (index * 7919) % (3 * 1024)
        path = directory / f"f{index:06d}.txt"
        start = index % 1000
        path.write_bytes(index.to_bytes(8, "big") + payload[start : start + size - 8])
        os.utime(path, (old, old))
        total += size
    return total


def bench_small_files(work: Path, count: int) -> None:
    tree = work / "many"
    total = make_small_files(tree, count)
    env = {**os.environ, "BACKER_HOME": str(work / "home")}
    backer = [sys.executable, "-m", "backer"]
    first, first_rss, _ = run_child([*backer, "init", str(tree)], work, env)
    rescan, rescan_rss, out2 = run_child([*backer, "scan"], tree, env)
    inner = out2.strip().split("scanned in ")[1].split("s:")[0]
    print(f"\n## {count} small files ({total / MIB:.0f} MiB)")
    row(
        "first scan (backer init)",
        f"{first:.2f} s",
        f"{count / first:.0f} files/s, RSS {first_rss:.0f} MiB",
    )
    row(
        "rescan, unchanged (whole CLI run)",
        f"{rescan:.2f} s",
        f"target <= 2 s, RSS {rescan_rss:.0f} MiB",
    )
    row("rescan, unchanged (walk + compare)", f"{inner} s")
    if shutil.which("rsync"):
        copy = work / "many-copy"
        subprocess.run(["cp", "-a", str(tree), str(copy)], check=True)
        shutil.rmtree(copy / ".backer")
        rsync = ["rsync", "--dry-run", f"{tree}/", f"{copy}/", "--exclude", ".backer"]
        walk, _ = timed(subprocess.run, [*rsync, "-a"])
        checksum, _ = timed(subprocess.run, [*rsync, "-ac"])
        row(
            "rsync -a --dry-run (stats both trees)",
            f"{walk:.2f} s",
            f"backer rescan/rsync {rescan / walk:.2f}",
        )
        row(
            "rsync -ac --dry-run (hashes both trees)",
            f"{checksum:.2f} s",
            f"backer first/rsync {first / checksum:.2f}",
        )
        shutil.rmtree(copy)
    shutil.rmtree(tree)


def bench_catch_up(work: Path, events: int) -> None:
    key = nacl.signing.SigningKey.generate()
    source = Journal(work / "source.db")
    for start in range(0, events, 10_000):
        source.append(key, [(3, os.urandom(60)) for _ in range(min(10_000, events - start))])
    author = bytes(key.verify_key)
    raws = [event.raw for event in source.events(author)]
    checkpoint = source.summary()[author]
    store_seconds = 0.0
    original = Journal._store

    def counted(self, *args):
        nonlocal store_seconds
        started = time.perf_counter()
        original(self, *args)
        store_seconds += time.perf_counter() - started

    totals = []
    for attempt in range(3):
        store_seconds = 0.0
        receiver = Journal(work / f"receiver{attempt}.db")
        Journal._store = counted
        try:
            seconds, _ = timed(receiver.ingest, raws, checkpoint, lambda author: True)
        finally:
            Journal._store = original
        totals.append((seconds, store_seconds))
    seconds, stored = min(totals)
    print(f"\n## Catch-up of {events} events (one signed checkpoint per batch)")
    row("verification only", f"{events / (seconds - stored):.0f} events/s", "target >= 100k/s")
    row("verification + storing in SQLite", f"{events / seconds:.0f} events/s")
    started = time.perf_counter()
    for raw in raws[:2000]:
        Event.decode(raw).verify()
    per_event = 2000 / (time.perf_counter() - started)
    row("for scale: one Ed25519 verify per event", f"{per_event:.0f} events/s")


MEMORY_PROBE = """
import gc, os, sys, psutil
sys.path.insert(0, sys.argv[2])
from backer.model.records import Kind, Version, new_version_id
from backer.model.state import FileState
count = int(sys.argv[1])
process = psutil.Process()
gc.collect()
before = process.memory_info().rss
state = FileState()
content = os.urandom(32)
for start in range(0, count, 1000):
    state.write(
        (f"photos/{i // 1000:04d}/IMG_{i:07d}.jpg", new_version_id(),
         Version(Kind.FILE, 2_500_000 + i, 1_700_000_000_000_000_000 + i, False, content,
                 b"device01", 1_700_000_000_000))
        for i in range(start, min(start + 1000, count))
    )
gc.collect()
print((process.memory_info().rss - before) / count)
"""


def bench_state_memory(counts: list[int]) -> None:
    print("\n## Resident memory of the CRDT state (synthetic entries through the state API)")
    for count in counts:
        result = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, str(count), str(ROOT)],
            capture_output=True,
            text=True,
            check=True,
        )
        row(f"{count} files", f"{float(result.stdout):.0f} B/file", "target <= 600")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--memory", default="100000,1000000")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="backer-bench-", dir=args.workdir))
    try:
        print(f"# backer scan benchmarks ({os.cpu_count()} cores, Python {sys.version.split()[0]})")
        bench_big_file(work, args.big_mib)
        bench_small_files(work, args.files)
        bench_catch_up(work, args.events)
        bench_state_memory([int(n) for n in args.memory.split(",")])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
