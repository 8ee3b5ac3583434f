"""The web API under load: its read endpoints on a big share, and how much a client that
polls them slows down replication.

    python -m benchmarks.web_api --before SRC [--files 45000] [--rounds 2] [--workdir DIR]

Two devices on 127.0.0.1 share ``--files`` small files (20 folders of 45 of 50 files, and
``hist.txt`` with 5 versions: the top folder has 21 entries). Then, per round, for the
code in ``SRC`` (a checkout to compare with, e.g. ``git archive main``) and for this
checkout, one after the other (A, B, A, B: the load others put on the machine falls on
both alike), both nodes run that code and:

1. each read endpoint of B is asked 5 times (median wall time, bytes of the answer);
2. a small file written on A until identical on B, 5 times, idle;
3. the same while one client asks B for ``changes?path=hist.txt`` in a loop, and while
   one asks for what the page reloads after each event (share, top folder, conflicts).

B's CPU seconds (user + system) are taken for each phase. Every process is stopped by
its PID and the work directory removed at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from .measure import Processes, free_port, work_directory

ENDPOINTS = (
    "/api/shares",
    "/api/shares/b/files?path=",
    "/api/shares/b/changes",
    "/api/shares/b/changes?path=hist.txt",
    "/api/shares/b/conflicts",
)
PAGE_RELOAD = ("/api/shares", "/api/shares/b/files?path=", "/api/shares/b/conflicts")
PROBES = 5
PROBE_TIMEOUT_S = 120
POLL_REQUESTS = 100_000  # a polling client's bound (it stops with its phase)


class Pair:
    def __init__(self, work: Path, processes: Processes) -> None:
        self.work, self.processes = work, processes
        self.roots = {side: work / side for side in "ab"}
        self.ports = {side: free_port() for side in "ab"}
        self.api_port = free_port()
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}

    def env(self, side: str, source: Path | None = None) -> dict[str, str]:
        env = {**os.environ, "BACKER_HOME": str(self.work / f"home-{side}")}
        if source is not None:
            env["PYTHONPATH"] = str(source)
        return env

    def cli(self, side: str, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "backer", *args],
            env=self.env(side), capture_output=True, text=True, timeout=3600, cwd=self.work,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"backer {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def start(self, side: str, source: Path | None) -> None:
        log = self.work / f"run-{side}.log"
        command = [sys.executable, "-m", "backer", "run", "--listen",
                   f"127.0.0.1:{self.ports[side]}", "--log-level", "info", "--api",
                   f"127.0.0.1:{self.api_port}" if side == "b" else "off"]  # fmt: skip
        offset = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as handle:
            node = self.processes.start(  # (not in a checkout: -m would import that one)
                command, env=self.env(side, source), stderr=handle, cwd=self.work
            )
        self.nodes[side] = node
        deadline = time.monotonic() + 600
        while "watching" not in log.read_text(errors="replace")[offset:]:
            if node.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"backer run ({side}) did not start: {log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes.values():
            self.processes.stop(node)
        self.nodes.clear()

    def get(self, path: str) -> tuple[float, int]:
        """(seconds, bytes) of one GET to B's API."""
        key = (self.work / "home-b" / "api-key").read_text().strip()
        started = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=600)
        connection.request(
            "GET", path, headers={"Authorization": f"Bearer {key}", "Host": self.host}
        )
        response = connection.getresponse()
        body = response.read()
        connection.close()
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status} {body[:200]!r}")
        return time.perf_counter() - started, len(body)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.api_port}"

    def cpu(self) -> float:
        times = psutil.Process(self.nodes["b"].pid).cpu_times()
        return times.user + times.system


def make_share(root: Path, files: int) -> None:
    for n in range(files):
        folder = root / f"t{n % 20:02d}" / f"s{n // 20 % 45:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{n:06d}.txt").write_bytes(f"file {n}\n".encode() * 8)


def propagation(pair: Pair, label: str) -> list[float]:
    """Seconds from a small file written on A until it is whole on B, PROBES times."""
    found = []
    for n in range(PROBES):
        name, data = f"probe-{label}-{n}.txt", f"probe {label} {n}\n".encode()
        target = pair.roots["b"] / name
        started = time.perf_counter()
        (pair.roots["a"] / name).write_bytes(data)
        while not (target.exists() and target.read_bytes() == data):
            if time.perf_counter() - started > PROBE_TIMEOUT_S:
                raise RuntimeError(f"{name} did not reach B in {PROBE_TIMEOUT_S} s")
            time.sleep(0.005)
        found.append(time.perf_counter() - started)
        time.sleep(0.5)
    return found


def polled(pair: Pair, paths: tuple[str, ...], label: str) -> dict[str, Any]:
    """:func:`propagation` while one client asks for ``paths`` round and round."""
    stop = threading.Event()
    took: list[float] = []

    def poll() -> None:
        for n in range(POLL_REQUESTS):
            if stop.is_set():
                return
            took.append(pair.get(paths[n % len(paths)])[0])

    client = threading.Thread(target=poll)
    client.start()
    try:
        cpu = pair.cpu()
        lags = propagation(pair, label)
        cpu = pair.cpu() - cpu
    finally:
        stop.set()
        client.join()
    return {"lags": lags, "cpu_s": cpu, "requests": len(took)}


def measure(pair: Pair, source: Path | None, label: str) -> dict[str, Any]:
    pair.start("a", source)
    pair.start("b", source)
    try:
        deadline = time.monotonic() + 120
        while "session with" not in (pair.work / "run-b.log").read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("no session between A and B")
            time.sleep(0.1)
        time.sleep(2)
        result: dict[str, Any] = {"endpoints": {}}
        for path in ENDPOINTS:
            cpu = pair.cpu()
            runs = [pair.get(path) for _ in range(5)]
            result["endpoints"][path] = {
                "median_s": statistics.median(s for s, _ in runs),
                "bytes": runs[0][1],
                "cpu_s": (pair.cpu() - cpu) / 5,
            }
        cpu = pair.cpu()
        result["idle"] = {"lags": propagation(pair, f"{label}-idle"), "cpu_s": 0.0}
        result["idle"]["cpu_s"] = pair.cpu() - cpu
        result["polling_history"] = polled(pair, ENDPOINTS[3:4], f"{label}-hist")
        result["polling_page"] = polled(pair, PAGE_RELOAD, f"{label}-page")
        return result
    finally:
        pair.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--files", type=int, default=45_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    after = Path(__file__).resolve().parent.parent
    results: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with Processes().running() as processes, work_directory("web-api-", args.workdir) as work:
        pair = Pair(work, processes)
        for root in pair.roots.values():
            root.mkdir()
        make_share(pair.roots["a"], args.files)
        for n in range(5):
            (pair.roots["a"] / "hist.txt").write_text(f"version {n}\n")
            if n == 0:
                pair.cli("a", "init", str(pair.roots["a"]))
            else:
                pair.cli("a", "scan", "--dir", str(pair.roots["a"]))
        address = f"127.0.0.1:{pair.ports['a']}"
        token = pair.cli(
            "a", "invite", "--no-wait", "--address", address, "--dir", str(pair.roots["a"])
        )
        pair.start("a", None)
        pair.cli("b", "join", token.strip(), str(pair.roots["b"]))
        pair.stop()
        last = pair.roots["b"] / "t19" / f"s{(args.files - 1) // 20 % 45:02d}"
        pair.start("a", None)
        pair.start("b", None)
        started = time.monotonic()
        while not (last / f"f{args.files - 1:06d}.txt").exists():
            if time.monotonic() - started > 3600:
                raise RuntimeError("B never got the share")
            time.sleep(1)
        time.sleep(5)
        pair.stop()
        print(f"set up: {args.files} files on both", flush=True)
        for round_ in range(args.rounds):
            for label, source in (("before", args.before), ("after", after)):
                result = measure(pair, source, f"{label}{round_}")
                result["load"] = os.getloadavg()
                results[label].append(result)
                print(label, json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
