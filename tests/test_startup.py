"""What a ``backer`` process loads before it does anything: every CLI process pays for
its imports (the suite runs hundreds), so the commands that need no share load neither
the engine nor the node, and a share's commands load neither the node, its web server,
its watcher, the network sessions nor the progress display they do not show."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ENGINE = {"asyncio", "journal", "pycrdt", "sqlite_utils", "backer.model.share"}
NODE = {
    "aiohttp",
    "watchdog",
    "cryptography",
    "rich",
    "backer.api.server",
    "backer.connections.transport",
    "backer.node.node",
    "backer.scanner.watch",
}


def loaded(*args: str, cwd: Path | None = None) -> set[str]:
    """The modules ``backer ARGS`` imports (``python -X importtime``'s list)."""
    env = {**os.environ}
    env.pop("BACKER_DEBUG", None)
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "backer", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    return {line.rpartition("|")[2].strip() for line in lines[1:]}  # (the first: a header)


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["run", "--help"], ["shares"]])
def test_commands_without_a_share_load_no_engine(args: list[str]) -> None:
    modules = loaded(*args)
    assert "click" in modules  # (the list is read as it should be)
    assert not modules & (ENGINE | NODE)


def test_a_shares_commands_load_no_node(tmp_path: Path) -> None:
    root = tmp_path / "share"
    root.mkdir()
    (root / "notes.txt").write_text("a\n")
    subprocess.run(
        [sys.executable, "-m", "backer", "init", str(root), "-q"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    modules = loaded("status", cwd=root)
    assert "backer.model.share" in modules
    assert not modules & NODE
