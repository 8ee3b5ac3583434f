"""Shared fixtures: every test device gets its own BACKER_HOME under tmp_path.

The suite runs in parallel workers (pytest-xdist, see pyproject.toml): nothing a test
makes may have a fixed name outside its tmp_path (ports: tests.e2e.free_port; network
namespaces: tests.netns)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import nacl.signing
import pytest

from backer.model.share import Share
from tests.e2e import run_backer


@pytest.fixture
def key() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey.generate()


@pytest.fixture
def share(tmp_path: Path, key: nacl.signing.SigningKey) -> Share:
    """A new share of one device in ``tmp_path/share``."""
    root = tmp_path / "share"
    root.mkdir()
    return Share.create(root, key)


def pytest_configure(config: pytest.Config) -> None:
    """The hundreds of ``python -m backer`` subprocesses would each compile backer from
    source again where the environment forbids writing bytecode (0.1 s of CPU each).
    They get SIGINT as from a terminal even where the suite runs as a script's
    background job, whose shell ignores SIGINT (children inherit that, and backer then
    keeps ignoring it: the Ctrl-C tests would see nothing)."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def backer_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test, even one that forgets it, has its own device home: never the user's,
    never another (parallel) test's."""
    home = tmp_path / "home"
    monkeypatch.setenv("BACKER_HOME", str(home))
    return home


CliResult = subprocess.CompletedProcess[str]


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., CliResult]:
    """Run the real ``backer`` CLI in a subprocess with its own BACKER_HOME."""
    home = tmp_path / "cli-home"

    def run(*args: str, cwd: Path | None = None, check: bool = True) -> CliResult:
        env = {**os.environ, "BACKER_HOME": str(home)}
        env.pop("BACKER_DEBUG", None)
        return run_backer(*args, env=env, check=check, timeout=120, cwd=cwd)

    return run
