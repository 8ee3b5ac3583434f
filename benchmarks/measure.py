"""Measuring tools for the benchmarks: peak memory, child processes, tree comparison.

Every process a benchmark starts goes through :class:`Processes`, which stops each one
by its PID (SIGTERM, then SIGKILL) when the run ends — normally, on an error or on
Ctrl-C — so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
    read through mmap counts in the RSS while the kernel can drop it at any time."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.processes = {}
        for name, pid in pids.items():
            with contextlib.suppress(psutil.Error):
                self.processes[name] = psutil.Process(pid)
        self.peaks = dict.fromkeys(pids, 0)
        self.anonymous = dict.fromkeys(pids, 0)
        self.running = True

    def run(self) -> None:
        while self.running:
            for name, process in self.processes.items():
                with contextlib.suppress(psutil.Error):
                    for one in [process, *process.children(recursive=True)]:
                        info = one.memory_info()
                        self.peaks[name] = max(self.peaks[name], info.rss)
                        self.anonymous[name] = max(self.anonymous[name], info.rss - info.shared)
            time.sleep(0.02)

    def stop(self) -> dict[str, float]:
        self.running = False
        self.join()
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


def run_measured(
    processes: Processes, args: list[str], env: dict[str, str] | None = None, **watch: int
) -> tuple[float, dict[str, float], str]:
    """Run a command to its end: (seconds, peak RSS in MiB of it and of ``watch``ed
    PIDs, its stdout). A failure stops the benchmark with the command's error."""
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
    return seconds, peaks, stdout.decode()


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
