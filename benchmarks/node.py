"""The resident node (``backer run``) against Syncthing's daemon, side by side in one run.

    python -m benchmarks.node [--tools backer,syncthing] [--phases pair,idle] [--changes 50]
                              [--burst 1000] [--idle 60] [--files 100000] [--seed 1]
                              [--workdir DIR] [--json FILE] [--profile DIR]

Per tool, two devices on 127.0.0.1 run unattended (backer: ``init``, ``invite``, ``join``,
then ``backer run`` on both; Syncthing: two headless instances set up as in
``benchmarks/tools.py``, watcher on with ``fsWatcherDelayS`` 1, its minimum), and:

1. **latency**: one small file written on A at a time, until byte-identical on B (B's
   file polled every 5 ms, 30 s at most each);
2. **burst**: 1,000 small files created on A in one go, until all are identical on B;
3. **shifted insert**: four 256 MiB files renamed into A and synced, then 10 bytes
   inserted in the middle of each (new versions written outside the share, renamed in
   at once) until identical on B; rsync (daemon, delta transfer) times the same step,
   by default and with ``--fsync`` (each file it writes flushed, as backer flushes them);
4. **idle** (phase ``idle``): one device on a 100,000-file share: CPU over 60 s idle,
   RSS, and start-up to watching after a clean stop (three times).

Only one tool runs at a time. After each step both trees are compared by path, size and
SHA-256. Every process is stopped by its PID and the work directory removed at the end,
also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import psutil

from . import limits
from .datasets import PROFILES, Profile, insert_in_large_files, many
from .measure import MIB, Processes, cpu_seconds, free_port, tree_digest, work_directory
from .tools import FOLDER, Rsync, _Instance, backer_env, syncthing_pair

LATENCY_TIMEOUT_S = 30
LATENCY_POLL_S = 0.005
STEP_TIMEOUT_S = 600
START_TIMEOUT_S = 120
# backer run logs this once its start-up scan is done and the watcher is on
WATCHING = re.compile(r"\bwatching\b")


# -- the tools' resident processes --------------------------------------------------------


class Nodes:
    """One tool's resident processes: a pair A ⇄ B, or one device alone (``solo``)."""

    name = ""
    exclude: tuple[str, ...] = ()

    def __init__(self, work: Path, processes: Processes) -> None:
        self.work, self.processes = work, processes

    def version(self) -> str:
        raise NotImplementedError

    def pair(self, a: Path, b: Path) -> None:
        """Both devices running and connected, sharing ``a`` (may hold files) and ``b``."""
        raise NotImplementedError

    def solo(self, root: Path) -> None:
        """One device running on ``root``, indexed and watching."""
        raise NotImplementedError

    def pid(self) -> int:
        """The process of device A."""
        raise NotImplementedError

    def pids(self) -> list[int]:
        """The processes of both devices of a pair (their CPU time is measured)."""
        raise NotImplementedError

    def restart(self) -> tuple[float, float]:
        """A clean stop of A, then a start: (seconds to stop, seconds to watching)."""
        raise NotImplementedError


class BackerNodes(Nodes):
    name = "backer"
    exclude = (".backer",)

    # with --profile: each ``backer run`` under cProfile, its stats written on a clean stop
    profiles: Path | None = None

    def __init__(self, work: Path, processes: Processes) -> None:
        super().__init__(work, processes)
        self.ports = {side: free_port() for side in "ab"}
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self.starts = 0

    def version(self) -> str:
        return self._cli("a", "--version").strip()

    def env(self, side: str) -> dict[str, str]:
        return backer_env(self.work / f"home-{side}")

    def _cli(self, side: str, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "backer", *args], env=self.env(side),
            capture_output=True, text=True, timeout=STEP_TIMEOUT_S,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"backer {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def start(self, side: str, timeout: float = START_TIMEOUT_S) -> float:
        """Start ``backer run``; seconds from the process start to its "watching" line."""
        log = self.work / f"run-{side}.log"
        offset = log.stat().st_size if log.exists() else 0
        command = [sys.executable, "-m", "backer", "run",
                   "--listen", f"127.0.0.1:{self.ports[side]}",
                   "--api", f"127.0.0.1:{free_port()}"]  # fmt: skip
        if self.profiles is not None:
            self.starts += 1
            stats = self.profiles / f"{self.work.name}-{side}-{self.starts}.prof"
            command[1:1] = ["-m", "cProfile", "-o", str(stats)]
        with open(log, "ab") as handle:
            started = time.perf_counter()
            node = self.processes.start(
                command, env=self.env(side), stdout=subprocess.DEVNULL, stderr=handle
            )
        self.nodes[side] = node
        deadline = started + timeout
        while True:
            with open(log, "rb") as handle:
                handle.seek(offset)
                if WATCHING.search(handle.read().decode(errors="replace")):
                    return time.perf_counter() - started
            if node.poll() is not None:
                raise RuntimeError(f"backer run exited: {log.read_text()[-2000:]}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"backer run not watching after {timeout:.0f} s")
            time.sleep(LATENCY_POLL_S)

    def pair(self, a: Path, b: Path) -> None:
        self._cli("a", "init", str(a))
        address = f"127.0.0.1:{self.ports['a']}"
        token = self._cli("a", "invite", "--no-wait", "--address", address, "--dir", str(a))
        self.start("a")
        self._cli("b", "join", token.strip(), str(b))
        self.start("b")

    def solo(self, root: Path) -> None:
        self._cli("a", "init", str(root))
        self.start("a")

    def pid(self) -> int:
        return self.nodes["a"].pid

    def pids(self) -> list[int]:
        return [self.nodes[side].pid for side in "ab"]

    def restart(self) -> tuple[float, float]:
        started = time.perf_counter()
        self.processes.stop(self.nodes["a"])
        if self.nodes["a"].returncode != 0:
            raise RuntimeError(f"backer run exited with {self.nodes['a'].returncode} on SIGTERM")
        return time.perf_counter() - started, self.start("a")


class SyncthingNodes(Nodes):
    name = "syncthing"
    exclude = (".stfolder", ".stversions")

    def version(self) -> str:
        out = subprocess.run(["syncthing", "--version"], capture_output=True, text=True).stdout
        return " ".join(out.split()[:2])

    def pair(self, a: Path, b: Path) -> None:
        b.mkdir(exist_ok=True)
        self.one, self.two = syncthing_pair(self.work, self.processes)
        two = self.two
        self.one.add_folder(a, two)
        two.add_folder(b, self.one)
        for instance in (self.one, two):
            _Instance._until(lambda i=instance: i.status()["state"] == "idle", STEP_TIMEOUT_S)

    def solo(self, root: Path) -> None:
        self.one = _Instance(self.work / "st-a", self.processes)
        self.one.add_folder(root, None)
        self._scanned(0)

    def _scanned(self, since: int) -> None:
        """Wait for the folder's first scan after event ``since`` to end (scanning → idle)."""
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while time.monotonic() < deadline:
            for event in self.one.rest.events(since, ("StateChanged",), 5):
                since = max(since, event["id"])
                data = event["data"]
                if data["folder"] == FOLDER and data["from"] == "scanning" and data["to"] == "idle":
                    return
        raise RuntimeError(f"Syncthing's folder not scanned after {STEP_TIMEOUT_S} s")

    def pid(self) -> int:
        return self.one.process.pid

    def pids(self) -> list[int]:
        return [self.one.process.pid, self.two.process.pid]

    def restart(self) -> tuple[float, float]:
        started = time.perf_counter()
        self.one.stop()
        stopped = time.perf_counter() - started
        started = time.perf_counter()
        self.one.start()
        self._scanned(0)
        return stopped, time.perf_counter() - started


NODES: dict[str, type[BackerNodes] | type[SyncthingNodes]] = {
    "backer": BackerNodes,
    "syncthing": SyncthingNodes,
}


# -- waiting for B ------------------------------------------------------------------------


def wait_for_contents(
    root: Path, expected: dict[str, bytes], timeout: float, interval: float
) -> float:
    """Poll until every file ``root/path`` holds exactly ``expected[path]``; returns the
    ``time.perf_counter()`` at which the last one was seen identical. Each poll lists
    the directories once and reads only files that appeared with the right size, so the
    poller's CPU stays small (it is measured and reported)."""
    pending: dict[Path, dict[str, bytes]] = {}
    for path, content in expected.items():
        pending.setdefault((root / path).parent, {})[(root / path).name] = content
    deadline = time.perf_counter() + timeout
    while True:
        for directory, files in list(pending.items()):
            try:
                present = set(os.listdir(directory)).intersection(files)
            except OSError:
                continue
            for name in present:
                with contextlib.suppress(OSError):
                    path = directory / name
                    if path.stat().st_size == len(files[name]) and path.read_bytes() == files[name]:
                        del files[name]
            if not files:
                del pending[directory]
        now = time.perf_counter()
        if not pending:
            return now
        if now > deadline:
            left = sum(len(files) for files in pending.values())
            raise RuntimeError(f"{left} files not identical on B after {timeout:.0f} s")
        time.sleep(interval)


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def wait_for_replacements(root: Path, sizes: dict[str, int], timeout: float) -> float:
    """Poll (stat only, every 10 ms: no hashing while the tool works) until each file
    ``root/path`` is a new file of ``sizes[path]`` bytes; both tools rename a verified
    temp file into place, so a new inode of the right size is the finished file. The
    caller compares contents afterwards."""
    before = {path: _identity(root / path) for path in sizes}
    pending = dict(sizes)
    deadline = time.perf_counter() + timeout
    while True:
        for path, size in list(pending.items()):
            now = _identity(root / path)
            if now is not None and now != before[path] and now[1] == size:
                del pending[path]
        if not pending:
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{len(pending)} large files not replaced on B after {timeout} s")
        time.sleep(0.01)


def check_identical(nodes: Nodes, a: Path, b: Path, step: str) -> None:
    if tree_digest(a, nodes.exclude) != tree_digest(b, nodes.exclude):
        raise RuntimeError(f"{nodes.name}: trees differ after {step}")


# -- the steps ----------------------------------------------------------------------------


def _small(label: str, index: int, size: int = 1024) -> bytes:
    return f"{label} {index} ".encode().ljust(size, b".")


def latency(a: Path, b: Path, changes: int, seed: int) -> dict[str, Any]:
    """One new 1 KiB file on A at a time; seconds until identical on B, for each."""
    rng = random.Random(seed)
    seconds = []
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    for index in range(changes):
        path, content = f"latency-{index:03d}.txt", _small("latency", index)
        started = time.perf_counter()
        (a / path).write_bytes(content)
        done = wait_for_contents(b, {path: content}, LATENCY_TIMEOUT_S, LATENCY_POLL_S)
        seconds.append(done - started)
        time.sleep(rng.uniform(0.05, 0.25))  # not in step with any periodic timer
    poller = (time.process_time() - cpu_before) / (time.perf_counter() - wall_before)
    return {
        "seconds": seconds,
        "p50": percentile(seconds, 50),
        "p95": percentile(seconds, 95),
        "poller_cpu_pct": 100 * poller,
    }


def burst(a: Path, b: Path, count: int) -> dict[str, Any]:
    """``count`` new 1 KiB files in A's (existing) ``burst`` directory, written in one go."""
    files = {f"burst/b{index:04d}.txt": _small("burst", index) for index in range(count)}
    started = time.perf_counter()
    for path, content in files.items():
        (a / path).write_bytes(content)
    created = time.perf_counter() - started
    cpu_before = time.process_time()
    done = wait_for_contents(b, files, STEP_TIMEOUT_S, 0.02)
    poller = (time.process_time() - cpu_before) / (time.perf_counter() - started - created)
    return {"seconds": done - started, "created_in_s": created, "poller_cpu_pct": 100 * poller}


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least ``q`` % of the values at or below."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _large_sizes(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in root.iterdir() if p.name.startswith("large-")}


def shifted_insert(nodes: Nodes, a: Path, b: Path, dataset: Path, seed: int) -> dict[str, Any]:
    """The four 256 MiB files renamed into A (timed until on B), then the insert (timed)."""
    staging = nodes.work / "staging"
    shutil.copytree(dataset, staging)
    sizes = _large_sizes(staging)
    devices = [psutil.Process(pid) for pid in nodes.pids()]
    started, cpu = time.perf_counter(), [cpu_seconds(p.pid)[0] for p in devices]
    for name in sizes:
        os.replace(staging / name, a / name)
    arrived = wait_for_replacements(b, sizes, STEP_TIMEOUT_S) - started
    arrival_cpu = [cpu_seconds(p.pid)[0] - before for p, before in zip(devices, cpu, strict=True)]
    check_identical(nodes, a, b, "1 GiB in four files")
    insert_in_large_files(a, seed, nodes.exclude, staging=staging)
    cpu = [cpu_seconds(p.pid)[0] for p in devices]
    started, own = time.perf_counter(), time.process_time()  # the renames took microseconds
    done = wait_for_replacements(b, {n: s + 10 for n, s in sizes.items()}, STEP_TIMEOUT_S)
    poller = (time.process_time() - own) / (done - started)
    insert_cpu = [cpu_seconds(p.pid)[0] - before for p, before in zip(devices, cpu, strict=True)]
    check_identical(nodes, a, b, "the insert")
    staging.rmdir()
    return {
        "arrival_1gib_s": arrived,
        "arrival_cpu_s": arrival_cpu,  # [A, B], user + system, until B had the files
        "seconds": done - started,
        "cpu_s": insert_cpu,
        "poller_cpu_pct": 100 * poller,
    }


def rsync_insert(
    work: Path, dataset: Path, seed: int, options: tuple[str, ...] = ()
) -> dict[str, Any]:
    """rsync's time for the same insert, run as ``python -m benchmarks`` runs it (with
    ``options`` added: ``--fsync`` makes it fsync each file it writes, as backer does)."""
    place = work / "rsync"
    place.mkdir()
    source, target = place / "a", place / "b"
    shutil.copytree(dataset, source)
    with Processes().running() as processes:
        tool = Rsync(place, source, target, processes)
        tool.options = options
        version = tool.version()
        tool.setup()
        tool.initial()
        insert_in_large_files(source, seed, ())
        step = tool.propagate()
    if tree_digest(source) != tree_digest(target):
        raise RuntimeError("rsync: trees differ after the insert")
    shutil.rmtree(place)
    return {"version": version, "seconds": step.seconds}


def insert_floor(work: Path, dataset: Path, seed: int) -> dict[str, Any]:
    """What no durable receiver of the insert can beat on this machine: the sender's
    manifest of one changed file (before it, nothing says what changed) plus the
    receiver's durable write of the four new versions (temp file, fsync, rename; B must
    write every byte of each: ext4 cannot share extents between files)."""
    place = work / "floor"
    shutil.copytree(dataset, place)
    insert_in_large_files(place, seed, ())
    files = sorted(path for path in place.iterdir() if path.stat().st_size >= 4 * MIB)
    manifest = limits.manifest_seconds(files[0])
    write = limits.durable_rewrite(files)
    shutil.rmtree(place)
    return {"first_manifest_s": manifest, "durable_write_s": write, "seconds": manifest + write}


def _largest_rss(process: psutil.Process) -> int:
    """The largest single process of the tree, as :class:`~.measure.PeakRss` counts
    (``syncthing serve`` keeps a small monitor process as the parent of its worker)."""
    return max(one.memory_info().rss for one in [process, *process.children(recursive=True)])


def settled(pid: int, seconds: float, settle: float = 10) -> dict[str, float]:
    """CPU (%) and RSS (MiB, median and peak of 0.5 s samples) of process ``pid`` over
    ``seconds`` idle, after ``settle`` s. Sampled, not read once: Syncthing's Go runtime
    hands memory back in steps, so one reading would depend on when it is taken."""
    time.sleep(settle)
    process = psutil.Process(pid)
    cpu, started = cpu_seconds(process.pid)[0], time.perf_counter()
    samples = []
    while time.perf_counter() - started < seconds:
        samples.append(_largest_rss(process) / MIB)
        time.sleep(0.5)
    cpu, wall = cpu_seconds(process.pid)[0] - cpu, time.perf_counter() - started
    return {
        "cpu_pct": 100 * cpu / wall,
        "rss_median_mib": statistics.median(samples),
        "rss_peak_mib": max(samples),
    }


def idle(nodes: Nodes, seconds: float, settle: float = 10) -> dict[str, Any]:
    """:func:`settled` for device A, then three clean restarts timed to watching, each
    with the CPU seconds the started process (tree) used until then: comparable between
    runs on a loaded machine, where the wall time is not."""
    result = settled(nodes.pid(), seconds, settle)
    stops, starts, cpus = [], [], []
    for _ in range(3):
        stop, start = nodes.restart()
        stops.append(stop)
        starts.append(start)
        cpus.append(cpu_seconds(nodes.pid())[0])
    return {
        **result,
        "stop_s": stops,
        "startup_s": starts,
        "startup_median_s": statistics.median(starts),
        "startup_cpu_s": cpus,
        "startup_cpu_median_s": statistics.median(cpus),
    }


# -- a run --------------------------------------------------------------------------------


def run_pair(kind: type[Nodes], work: Path, args: argparse.Namespace, large_set: Path) -> dict:
    place = work / kind.name
    place.mkdir()
    a, b = place / "a", place / "b"
    (a / "burst").mkdir(parents=True)
    (a / "burst" / "placeholder.txt").write_bytes(_small("placeholder", 0))
    result: dict[str, Any] = {}
    with Processes().running() as processes:
        nodes = kind(place, processes)
        result["version"] = nodes.version()
        say(f"{kind.name}: setting up two devices")
        nodes.pair(a, b)
        # both live: the placeholder has arrived (no clock yet)
        wait_for_contents(
            b, {"burst/placeholder.txt": _small("placeholder", 0)}, STEP_TIMEOUT_S, 0.05
        )
        say(f"{kind.name}: latency, {args.changes} changes")
        result["latency"] = latency(a, b, args.changes, args.seed)
        say(f"{kind.name}: latency p50 {result['latency']['p50']:.3f} s")
        say(f"{kind.name}: burst of {args.burst} files")
        result["burst"] = burst(a, b, args.burst)
        check_identical(nodes, a, b, "the burst")
        say(f"{kind.name}: burst {result['burst']['seconds']:.2f} s")
        say(f"{kind.name}: shifted insert")
        result["insert"] = shifted_insert(nodes, a, b, large_set, args.seed)
        say(f"{kind.name}: insert {result['insert']['seconds']:.2f} s")
    shutil.rmtree(place)
    return result


def run_idle(kind: type[Nodes], work: Path, args: argparse.Namespace, share: Path) -> dict:
    """Idle cost on ``share`` itself (copying and removing 100,000 files per tool would
    take minutes); the tool's own metadata folders are removed again afterwards."""
    place = work / f"{kind.name}-idle"
    place.mkdir()
    with Processes().running() as processes:
        nodes = kind(place, processes)
        say(f"{kind.name}: indexing {args.files:,} files")
        nodes.solo(share)
        say(f"{kind.name}: idle {args.idle:.0f} s")
        result = idle(nodes, args.idle)
        say(f"{kind.name}: idle CPU {result['cpu_pct']:.2f} %, {result['rss_median_mib']:.0f} MiB")
    shutil.rmtree(place)
    for name in kind.exclude:
        shutil.rmtree(share / name, ignore_errors=True)
    return result


def say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def _ratio(mine: float | None, theirs: float | None) -> str:
    return "—" if mine is None or not theirs else f"{mine / theirs:.2f}"


def _met(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**not met**")


def poller_cpu(side: dict[str, Any]) -> float | None:
    """The largest share of a core the benchmark's pollers took in any timed step."""
    steps = [side.get(step, {}).get("poller_cpu_pct") for step in ("latency", "burst", "insert")]
    return max((p for p in steps if p is not None), default=None)


def report(results: dict[str, Any]) -> str:
    """The Markdown table: every measure per tool, backer ÷ Syncthing, the target."""
    backer, st = results.get("backer", {}), results.get("syncthing", {})
    rsync = results.get("rsync", {})

    def get(side: dict, *keys: str) -> float | None:
        for key in keys:
            if not isinstance(side, dict) or key not in side:
                return None
            side = side[key]
        return side  # type: ignore[return-value]

    rows: list[tuple[str, float | None, float | None, str, str, bool | None]] = []
    p50, st50 = get(backer, "latency", "p50"), get(st, "latency", "p50")
    rows.append((
        "latency p50 (s)", p50, st50, _ratio(p50, st50), "≤ 0.25 s and ≤ 0.25 × Syncthing",
        None if p50 is None else p50 <= 0.25 and (st50 is None or p50 <= 0.25 * st50),
    ))  # fmt: skip
    p95, st95 = get(backer, "latency", "p95"), get(st, "latency", "p95")
    rows.append(("latency p95 (s)", p95, st95, _ratio(p95, st95), "—", None))
    mine, theirs = get(backer, "burst", "seconds"), get(st, "burst", "seconds")
    rows.append((
        "burst of files (s)", mine, theirs, _ratio(mine, theirs), "≤ 3 s",
        None if mine is None else mine <= 3,
    ))  # fmt: skip
    mine, theirs = get(backer, "insert", "arrival_1gib_s"), get(st, "insert", "arrival_1gib_s")
    rows.append(("1 GiB (four files) arrives (s)", mine, theirs, _ratio(mine, theirs), "—", None))
    mine, theirs = get(backer, "insert", "seconds"), get(st, "insert", "seconds")
    rsync_s, fsynced = get(rsync, "seconds"), get(results.get("rsync_fsync", {}), "seconds")
    also = f"; rsync --fsync {fsynced:.2f} s, ÷ {_ratio(mine, fsynced)}" if fsynced else ""
    rows.append((
        "10 B inserted mid-file ×4 (s)", mine, theirs, _ratio(mine, theirs),
        f"≤ rsync ({rsync_s:.2f} s; backer ÷ rsync {_ratio(mine, rsync_s)}{also})"
        if rsync_s else "≤ rsync",
        None if mine is None or rsync_s is None else mine <= rsync_s,
    ))  # fmt: skip
    floor = results.get("floor", {})
    first, write = get(floor, "first_manifest_s"), get(floor, "durable_write_s")
    parts = f" (manifest {first:.2f} s + write {write:.2f} s)" if floor else ""
    rows.append((
        "its durable floor (s)", get(floor, "seconds"), None, "—",
        f"backer ÷ floor {_ratio(mine, get(floor, 'seconds'))}{parts}", None,
    ))  # fmt: skip
    mine, theirs = (get(side, "insert", "cpu_s") for side in (backer, st))
    mine, theirs = (None if cpu is None else sum(cpu) for cpu in (mine, theirs))
    rows.append(("CPU of A + B in the insert (s)", mine, theirs, _ratio(mine, theirs), "—", None))
    backer_idle, st_idle = backer.get("idle", {}), st.get("idle", {})
    mine, theirs = get(backer_idle, "cpu_pct"), get(st_idle, "cpu_pct")
    rows.append((
        "idle CPU (%)", mine, theirs, _ratio(mine, theirs), "≤ 1 %",
        None if mine is None else mine <= 1,
    ))  # fmt: skip
    mine, theirs = get(backer_idle, "rss_median_mib"), get(st_idle, "rss_median_mib")
    rows.append((
        "idle RSS, median (MiB)", mine, theirs, _ratio(mine, theirs), "≤ Syncthing's",
        None if mine is None or theirs is None else mine <= theirs,
    ))  # fmt: skip
    mine, theirs = get(backer_idle, "rss_peak_mib"), get(st_idle, "rss_peak_mib")
    rows.append(("idle RSS, peak (MiB)", mine, theirs, _ratio(mine, theirs), "—", None))
    mine, theirs = get(backer_idle, "startup_median_s"), get(st_idle, "startup_median_s")
    rows.append((
        "start-up to watching (s)", mine, theirs, _ratio(mine, theirs), "≤ 5 s",
        None if mine is None else mine <= 5,
    ))  # fmt: skip
    mine, theirs = get(backer_idle, "startup_cpu_median_s"), get(st_idle, "startup_cpu_median_s")
    rows.append(
        ("CPU of a start until watching (s)", mine, theirs, _ratio(mine, theirs), "—", None)
    )
    mine, theirs = poller_cpu(backer), poller_cpu(st)
    rows.append(("benchmark's own CPU while waiting, max (%)", mine, theirs, "—", "small", None))
    lines = [
        "| measure | backer | Syncthing | backer ÷ Syncthing | target | |",
        "|---|---|---|---|---|---|",
    ]
    for label, mine, theirs, ratio, target, ok in rows:
        cells = ["—" if v is None else f"{v:.3g}" if v < 10 else f"{v:.1f}" for v in (mine, theirs)]
        lines.append(f"| {label} | {' | '.join(cells)} | {ratio} | {target} | {_met(ok)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tools", default="backer,syncthing")
    parser.add_argument("--phases", default="pair,idle")
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--idle", type=float, default=60)
    parser.add_argument("--files", type=int, default=100_000, help="Files of the idle share.")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="Also write raw results here.")
    parser.add_argument(
        "--profile", type=Path, default=None,
        help="Run each backer node under cProfile; its stats go to this directory.",
    )  # fmt: skip
    args = parser.parse_args()
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        BackerNodes.profiles = args.profile.resolve()
    names = [n for n in args.tools.split(",") if n]
    phases = [p for p in args.phases.split(",") if p]
    unknown = [n for n in names if n not in NODES]
    unknown += [p for p in phases if p not in ("pair", "idle")]
    if unknown:
        parser.error(f"unknown tool or phase: {', '.join(unknown)}")
    if shutil.which("syncthing") is None and "syncthing" in names:
        parser.error("syncthing is not installed (apt-get install syncthing)")
    results: dict[str, Any] = {"load_before": os.getloadavg()}
    with work_directory("backer-nodebench-", args.workdir) as work:
        if "pair" in phases:
            large_set = work / "data-large"
            say("building 4 × 256 MiB")
            PROFILES["large"].build(large_set, args.seed)
            for name in names:
                results[name] = run_pair(NODES[name], work, args, large_set)
            if shutil.which("rsync"):
                results["rsync"] = rsync_insert(work, large_set, args.seed)
                results["rsync_fsync"] = rsync_insert(work, large_set, args.seed, ("--fsync",))
            results["floor"] = insert_floor(work, large_set, args.seed)
            shutil.rmtree(large_set)
        if "idle" in phases:
            many_set = work / "data-many"
            say(f"building {args.files:,} files")
            Profile("many", partial(many, count=args.files), ()).build(many_set, args.seed)
            for name in names:
                results.setdefault(name, {})["idle"] = run_idle(NODES[name], work, args, many_set)
            shutil.rmtree(many_set)
        results["load_after"] = os.getloadavg()
        print(f"# the node — {os.cpu_count()} cores, load {results['load_before'][0]:.2f}")
        print()
        print(report(results))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
