"""Measuring tools for the benchmarks: peak memory, child processes, tree comparison.

Every process a benchmark starts goes through :class:`Processes`, which stops each one
by its PID (SIGTERM, then SIGKILL) when the run ends — normally, on an error or on
Ctrl-C — so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import psutil

MIB = 1024 * 1024


def free_port(low: int = 20_000, high: int = 32_000) -> int:
    """A port of 127.0.0.1 free now in ``low``..``high``, by default below the ephemeral
    range (an outgoing connection cannot take it between a node's stop and its next
    start)."""
    for _ in range(100):
        port = random.randrange(low, high)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {low}-{high}")


def file_system(path: Path, mounts: str | None = None) -> str:
    """The file system holding ``path`` as ``TYPE DEVICE (OPTIONS)``, from ``mounts``
    (``/proc/mounts`` by default; the longest mount point containing it wins). It goes
    into the report because it decides much of the small-file times: Syncthing and
    backer fsync every file they write, rsync does not, and the same Syncthing sync
    costs several times more on a disk than on a tmpfs."""
    if mounts is None:
        mounts = Path("/proc/mounts").read_text()
    target, best = str(Path(path).resolve()), ("", "unknown file system")
    for line in mounts.splitlines():
        device, point, kind, options = line.split()[:4]
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, f"{kind} {device} ({options})")
    return best[1]


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU seconds of process ``pid`` and its descendants (``syncthing
    serve`` runs its worker as a child of a monitor process), and the system part alone:
    the kernel's share (writes, fsyncs, renames) is most of a sync of small files."""
    root = psutil.Process(pid)
    total = system = 0.0
    for one in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = one.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
            system += times.system + times.children_system
    return total, system


def wait_for_port(port: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {seconds:.0f} s")


class PeakRss(threading.Thread):
    """The largest resident size of any single process in each watched tree, sampled
    every 20 ms while running (a supervisor and its worker count separately); also,
    under ``NAME (anonymous)``, the largest share of it not backed by a file: a file
    read through mmap counts in the RSS while the kernel can drop it at any time.

    Finding a tree's processes means reading every process's parent from /proc (~8 ms
    of CPU here): that is done after 50, 100, 200 … ms, then once a second, not at every
    sample, so that the sampler does not take a core from the tools it measures.
    ``harness_cpu_pct`` is this whole process's CPU (this thread and any poller in the
    main thread) over the sampled time, in % of one core, for the report."""

    INTERVAL_S = 0.02
    TREE_EVERY_S = 1.0

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.roots = {}
        for name, pid in pids.items():
            with contextlib.suppress(psutil.Error):
                self.roots[name] = psutil.Process(pid)
        self.peaks = dict.fromkeys(pids, 0)
        self.anonymous = dict.fromkeys(pids, 0)
        self.harness_cpu_pct = 0.0
        self.running = True
        self._cpu, self._wall = time.process_time(), time.perf_counter()

    def _trees(self) -> dict[str, list[psutil.Process]]:
        children: dict[int, list[psutil.Process]] = {}
        for one in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                children.setdefault(one.ppid(), []).append(one)
        trees = {}
        for name, root in self.roots.items():
            members, pending = [], [root]
            while pending:
                one = pending.pop()
                members.append(one)
                pending.extend(children.get(one.pid, []))
            trees[name] = members
        return trees

    def run(self) -> None:
        trees, next_tree, gap = self._trees(), time.monotonic() + 0.05, 0.05
        while self.running:
            if time.monotonic() >= next_tree:
                trees = self._trees()
                gap = min(self.TREE_EVERY_S, gap * 2)
                next_tree = time.monotonic() + gap
            for name, members in trees.items():
                for one in members:
                    with contextlib.suppress(psutil.Error):
                        info = one.memory_info()
                        self.peaks[name] = max(self.peaks[name], info.rss)
                        self.anonymous[name] = max(self.anonymous[name], info.rss - info.shared)
            time.sleep(self.INTERVAL_S)

    def stop(self) -> dict[str, float]:
        self.running = False
        self.join()
        wall = time.perf_counter() - self._wall
        self.harness_cpu_pct = 100 * (time.process_time() - self._cpu) / max(wall, 1e-9)
        anonymous = {f"{name} (anonymous)": peak / MIB for name, peak in self.anonymous.items()}
        return {**{name: peak / MIB for name, peak in self.peaks.items()}, **anonymous}


class Processes:
    """Children started by a benchmark; all stopped by PID on exit."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(args, **kwargs)  # type: ignore[call-overload]
        self.started.append(child)
        return child

    def stop(self, child: subprocess.Popen[bytes]) -> None:
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(child.pid, signal.SIGKILL)
                child.wait()
        if child in self.started:
            self.started.remove(child)

    def stop_all(self) -> None:
        for child in list(reversed(self.started)):
            self.stop(child)

    @contextlib.contextmanager
    def running(self) -> Iterator[Processes]:
        try:
            yield self
        finally:
            self.stop_all()


@contextlib.contextmanager
def work_directory(prefix: str, parent: Path | None) -> Iterator[Path]:
    """A benchmark run's temporary directory, removed at the end however the run ends.
    SIGTERM is handled as Ctrl-C: the ``Processes`` contexts inside stop their children
    by PID on the way out, and the run exits with status 130 saying so."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield work
    except KeyboardInterrupt:
        print("interrupted: processes stopped, data removed", file=sys.stderr)
        sys.exit(130)
    finally:
        shutil.rmtree(work, ignore_errors=True)


class Measured(NamedTuple):
    seconds: float
    rss_mib: dict[str, float]  # peak RSS of "command" and of each watched PID's tree
    stdout: str
    harness_cpu_pct: float  # the benchmark's own CPU meanwhile, % of one core


def run_measured(
    processes: Processes, args: list[str], env: dict[str, str] | None = None, **watch: int
) -> Measured:
    """Run a command to its end, sampling the peak RSS of it and of the ``watch``ed
    PIDs. A failure stops the benchmark with the command's error."""
    started = time.perf_counter()
    child = processes.start(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sampler = PeakRss({"command": child.pid, **watch})
    sampler.start()
    stdout, stderr = child.communicate()
    seconds = time.perf_counter() - started
    peaks = sampler.stop()
    processes.stop(child)
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {stderr.decode().strip()}")
    return Measured(seconds, peaks, stdout.decode(), sampler.harness_cpu_pct)


def tree_digest(root: Path, exclude: tuple[str, ...] = ()) -> dict[str, tuple[int, str]]:
    """Every regular file below ``root``: size and SHA-256 (names in ``exclude`` at the
    top level, such as a tool's metadata folder, are skipped)."""
    result = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if relative.split("/")[0] in exclude or not path.is_file() or path.is_symlink():
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(4 * MIB):
                digest.update(block)
        result[relative] = (path.stat().st_size, digest.hexdigest())
    return result


def tree_listing(root: Path, exclude: tuple[str, ...] = ()) -> dict[str, int]:
    """Paths and sizes only: a cheap first check before :func:`tree_digest`."""
    result = {}
    for path in root.rglob("*"):
        relative = path.relative_to(root).as_posix()
        if relative.split("/")[0] in exclude or not path.is_file() or path.is_symlink():
            continue
        result[relative] = path.stat().st_size
    return result
