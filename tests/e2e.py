"""Helpers for end-to-end tests: devices as real CLI processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Device:
    """One device: its own BACKER_HOME and share directory."""

    def __init__(self, base: Path, name: str) -> None:
        self.home = base / f"{name}-home"
        self.root = base / name
        self.env = {**os.environ, "BACKER_HOME": str(self.home)}
        self.env.pop("BACKER_DEBUG", None)

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "backer", *args]

    def run(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.command(*args), env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(f"backer {' '.join(args)} failed:\n{result.stderr}")
        return result

    def sync(self, address: str) -> str:
        return self.run("sync", address, "--dir", str(self.root)).stdout

    @contextlib.contextmanager
    def serving(self, port: int | None = None) -> Iterator[str]:
        """``backer serve`` (on a fresh port by default); stopped by its PID at the end."""
        port = port or free_port()
        process = subprocess.Popen(
            self.command("serve", "--listen", f"127.0.0.1:{port}", "--dir", str(self.root)),
            env=self.env,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stderr is not None
        first = process.stderr.readline()
        assert "listening" in first, first
        try:
            yield f"127.0.0.1:{port}"
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            self.serve_log = process.stderr.read()


def invite(founder: Device, address: str) -> str:
    """A token naming ``address``, made while no other process holds the share."""
    args = ("invite", "--no-wait", "--address", address, "--dir", str(founder.root))
    return founder.run(*args).stdout.strip()


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` except .backer: kind, bytes or target, permission bits."""
    result: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if relative.split("/")[0] == ".backer":
            continue
        info = path.lstat()
        if path.is_symlink():
            result[relative] = ("link", os.readlink(path))
        elif path.is_dir():
            result[relative] = ("dir",)
        else:
            result[relative] = ("file", path.read_bytes(), info.st_mode & 0o777)
    return result


def summary_number(output: str, label: str, last: bool = False) -> int:
    """A number from the sync summary line, e.g. ``chunk bytes received`` (the first
    occurrence of ``label``, or the last)."""
    tail = output.rsplit(label, 1)[1] if last else output.split(label, 1)[1]
    return int(tail.split()[0].rstrip(";,"))
