"""What a ``backer`` process costs before it does its work: CPU seconds per command.

    python -m benchmarks.startup [--runs 10] [--against DIR]

Each command runs ``--runs`` times in a subprocess on a share of 20 small files, and
the median of its CPU (user + system of the child, from ``wait4``) is printed; for
``backer run --api off`` the CPU is read from ``/proc`` at its "watching" line (the
start-up scan done, the watcher on), then the node is stopped. ``--against DIR`` also
measures the backer source tree at DIR (another checkout, put first on ``PYTHONPATH``),
alternating the two run by run so that a change of the machine's load falls on both,
and prints the ratio. Bytecode is written (a first run compiles): CPU seconds, not
wall time, so that a loaded machine changes the numbers little.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

COMMANDS: dict[str, list[str]] = {
    "--version": ["--version"],
    "--help": ["--help"],
    "status": ["status"],
    "log --limit 5": ["log", "--limit", "5"],
    "sync to an address nothing listens on": ["sync", "127.0.0.1:9", "-q"],
}
WATCHING = "run --api off, to watching"
WATCHING_TIMEOUT_S = 60


def command_cpu(env: dict[str, str], share: Path, args: list[str]) -> float:
    process = subprocess.Popen(
        [sys.executable, "-m", "backer", *args],
        env=env,
        cwd=share,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)  # (reaped here, not by Popen)
    return usage.ru_utime + usage.ru_stime


def node_cpu(env: dict[str, str], share: Path) -> float:
    """CPU of ``backer run`` from its start to its "watching" line."""
    command = [sys.executable, "-m", "backer", "run", "--listen", "127.0.0.1:0", "--api", "off"]
    node = subprocess.Popen(command, env=env, cwd=share, stderr=subprocess.PIPE)
    assert node.stderr is not None
    try:
        said = b""
        deadline = time.monotonic() + WATCHING_TIMEOUT_S
        while b"watching" not in said:
            if time.monotonic() > deadline:
                raise RuntimeError(f"backer run did not say 'watching': {said.decode()}")
            if select.select([node.stderr], [], [], 1)[0]:
                chunk = os.read(node.stderr.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"backer run exited: {said.decode()}")
                said += chunk
        fields = Path(f"/proc/{node.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--against", type=Path, help="another backer source tree")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="backer-startup-") as tmp:
        env = {**os.environ, "BACKER_HOME": str(Path(tmp) / "home")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        envs = {"this tree": env}
        if options.against is not None:
            envs = {str(options.against): {**env, "PYTHONPATH": str(options.against)}, **envs}
        share = Path(tmp) / "share"
        share.mkdir()
        for i in range(20):
            (share / f"f{i}.txt").write_text(f"file {i}\n")
        subprocess.run(
            [sys.executable, "-m", "backer", "init", str(share), "-q"],
            env=env,
            check=True,
            capture_output=True,
        )
        cases: dict[str, Callable[[dict[str, str]], float]] = {
            name: lambda e, args=args: command_cpu(e, share, args)
            for name, args in COMMANDS.items()
        }
        cases[WATCHING] = lambda e: node_cpu(e, share)
        print(f"CPU s, median of {options.runs} | " + " | ".join(envs))
        for name, measure in cases.items():
            samples: dict[str, list[float]] = {label: [] for label in envs}
            for _ in range(options.runs):
                for label, one in envs.items():
                    samples[label].append(measure(one))
            medians = [statistics.median(samples[label]) for label in envs]
            ratio = f" | {medians[0] / medians[-1]:.1f} x" if len(medians) == 2 else ""
            print(f"backer {name} | " + " | ".join(f"{m:.2f}" for m in medians) + ratio)


if __name__ == "__main__":
    main()
