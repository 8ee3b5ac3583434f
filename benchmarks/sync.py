"""Initial sync between two local backer processes, with rsync measured in the same run.

    python benchmarks/sync.py [--large-mib 1024] [--files 10000] [--workdir DIR]

For each dataset — ``large`` (4 files, 1 GiB in all, incompressible) and ``small``
(10,000 files of 1-16 KiB in 100 directories) — it times a ``backer join`` from a
device serving the share into an empty directory (handshake, journal catch-up, chunk
transfer over an encrypted TCP session on 127.0.0.1, verified writes), samples the
peak resident memory of the serving and the joining process, and checks that the two
trees are identical. The anchor is an rsync daemon on 127.0.0.1 pulling the same data
into an empty directory. Every process started is stopped by its PID; the data lives in
a temporary directory removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PeakRss(threading.Thread):
    """Samples a process tree's largest single-process RSS every 20 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = 0
        self.running = True

    def run(self) -> None:
        while self.running:
            with contextlib.suppress(psutil.Error):
                for proc in [self.process, *self.process.children(recursive=True)]:
                    self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(0.02)

    def stop(self) -> float:
        self.running = False
        self.join()
        return self.peak / MIB


def run_measured(args: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    started = time.perf_counter()
    process = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    sampler = PeakRss(process.pid)
    sampler.start()
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    peak = sampler.stop()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {stderr.strip()}")
    return seconds, peak, stdout


def tree_digest(root: Path) -> dict[str, str]:
    digests = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if relative.split("/")[0] == ".backer" or not path.is_file():
            continue
        digests[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def backdate(root: Path) -> None:
    """Files an hour old, as on a real disk (fresh mtimes make the scanner re-hash)."""
    old = time.time() - 3600
    for path in root.rglob("*"):
        os.utime(path, (old, old))


def make_large(root: Path, total_mib: int) -> int:
    root.mkdir(parents=True)
    for n in range(4):
        with open(root / f"large-{n}.bin", "wb") as handle:
            for _ in range(total_mib // 4 // 4):
                handle.write(os.urandom(4 * MIB))
    backdate(root)
    return total_mib * MIB


def make_small(root: Path, count: int) -> int:
    root.mkdir(parents=True)
    total = 0
    for index in range(count):
        directory = root / f"dir{index % 100:02d}"
        directory.mkdir(exist_ok=True)
        size = 1024 + (index * 7919) % (15 * 1024)
        (directory / f"file{index:05d}.txt").write_bytes(os.urandom(size))
        total += size
    backdate(root)
    return total


def bench_backer(work: Path, source: Path) -> dict[str, float]:
    backer = [sys.executable, "-m", "backer"]
    env_a = {**os.environ, "BACKER_HOME": str(work / "home-a")}
    env_b = {**os.environ, "BACKER_HOME": str(work / "home-b")}
    init_seconds, _, _ = run_measured([*backer, "init", str(source)], env_a)
    port = free_port()
    token = subprocess.run(
        [*backer, "invite", "--no-wait", "--address", f"127.0.0.1:{port}", "--dir", str(source)],
        env=env_a,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    serve = subprocess.Popen(
        [*backer, "serve", "--listen", f"127.0.0.1:{port}", "--dir", str(source)],
        env=env_a,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert serve.stderr is not None and "listening" in serve.stderr.readline()
        sampler = PeakRss(serve.pid)
        sampler.start()
        target = work / "backer-copy"
        seconds, join_rss, _ = run_measured([*backer, "join", token, str(target)], env_b)
        serve_rss = sampler.stop()
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=10)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
    if tree_digest(source) != tree_digest(target):
        raise SystemExit("backer: trees differ after the sync")
    shutil.rmtree(target)
    shutil.rmtree(source / ".backer")
    return {
        "seconds": seconds,
        "init": init_seconds,
        "rss_source": serve_rss,
        "rss_target": join_rss,
    }


def bench_rsync(work: Path, source: Path) -> dict[str, float] | None:
    if shutil.which("rsync") is None:
        return None
    port = free_port()
    config = work / "rsyncd.conf"
    config.write_text(
        f"port = {port}\naddress = 127.0.0.1\nuse chroot = false\n"
        f"uid = {os.getuid()}\ngid = {os.getgid()}\n"
        f"[data]\npath = {source}\nread only = true\n"
    )
    daemon = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={config}"])
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
                break
            time.sleep(0.05)
        sampler = PeakRss(daemon.pid)
        sampler.start()
        target = work / "rsync-copy"
        seconds, client_rss, _ = run_measured(
            ["rsync", "-a", f"rsync://127.0.0.1:{port}/data/", f"{target}/"]
        )
        daemon_rss = sampler.stop()
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=10)
    if tree_digest(source) != tree_digest(target):
        raise SystemExit("rsync: trees differ after the copy")
    shutil.rmtree(target)
    return {"seconds": seconds, "rss_source": daemon_rss, "rss_target": client_rss}


def report(
    name: str, size: int, files: int, backer: dict[str, float], rsync: dict[str, float] | None
) -> None:
    print(f"\n## {name}: {files} files, {size / MIB:.0f} MiB")
    print(f"{'':34}{'seconds':>9}{'MB/s':>9}{'files/s':>10}{'RSS src MiB':>13}{'RSS dst MiB':>13}")
    rows = [("backer join (encrypted, verified)", backer)]
    if rsync:
        rows.append(("rsync daemon pull", rsync))
    for label, r in rows:
        seconds = r["seconds"]
        print(
            f"{label:34}{seconds:9.2f}{size / seconds / 1e6:9.1f}{files / seconds:10.0f}"
            f"{r['rss_source']:13.0f}{r['rss_target']:13.0f}"
        )
    if rsync:
        print(f"time ratio backer/rsync: {backer['seconds'] / rsync['seconds']:.2f}")
    print(f"(backer init, first scan of the source: {backer['init']:.2f} s, not included)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--large-mib", type=int, default=1024)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="backer-sync-bench-", dir=args.workdir))
    try:
        print(f"# backer sync benchmarks ({os.cpu_count()} cores, loopback TCP)")
        large = work / "large"
        size = make_large(large, args.large_mib)
        report("large", size, 4, bench_backer(work, large), bench_rsync(work, large))
        shutil.rmtree(large)
        small = work / "small"
        size = make_small(small, args.files)
        report("small", size, args.files, bench_backer(work, small), bench_rsync(work, small))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
