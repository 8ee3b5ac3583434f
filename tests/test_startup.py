"""What a ``backer`` process loads before it does anything: every CLI process pays for
its imports (the suite runs hundreds), so the commands that need no share load neither
the engine, the node nor the installed packages' metadata; a share's commands load
neither the node, its web server, its watcher, the network sessions nor the progress
display they do not show; a node loads the web server only when it serves the web UI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.e2e import Device, Node, run_backer

IMPORT_TIME = "PYTHONPROFILEIMPORTTIME"  # (python -X importtime)
METADATA = "importlib.metadata"  # (finds the installed packages' metadata on disk)
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


def loaded(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> set[str]:
    """The modules ``backer ARGS`` imports."""
    env = {**(env or os.environ), IMPORT_TIME: "1"}
    env.pop("BACKER_DEBUG", None)
    return imported(run_backer(*args, env=env, timeout=60, cwd=cwd).stderr)


def imported(stderr: str) -> set[str]:
    """The modules named in ``python -X importtime``'s lines on stderr."""
    lines = [line for line in stderr.splitlines() if line.startswith("import time:")]
    return {line.rpartition("|")[2].strip() for line in lines[1:]}  # (the first: a header)


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["run", "--help"], ["shares"]])
def test_commands_without_a_share_load_no_engine(args: list[str]) -> None:
    modules = loaded(*args)
    assert "click" in modules  # (the list is read as it should be)
    assert not modules & (ENGINE | NODE | {METADATA})


def test_a_share_and_its_node_load_only_what_they_use(tmp_path: Path) -> None:
    device = Device(tmp_path, "share")
    device.root.mkdir()
    (device.root / "notes.txt").write_text("a\n")
    device.run("init", str(device.root), "-q")
    status = loaded("status", cwd=device.root, env=device.env)
    assert "backer.model.share" in status
    assert not status & NODE

    node = Node(device, 0, {IMPORT_TIME: "1"}, listen="127.0.0.1:0")  # (with --api off)
    try:
        node.wait_for("watching")
    finally:
        node.stop()
    served = imported(node.log)
    assert {"backer.node.node", "backer.scanner.watch"} <= served
    assert not served & {"aiohttp", "backer.api.server"}  # (only a node serving the web UI)
