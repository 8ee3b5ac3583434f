"""Share commands while a node holds the share: they ask it over the control channel
and print its answers as they print their own results."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from backer.config.identity import load_or_create_key
from backer.connections import control
from backer.model.share import Share
from tests.e2e import Device

Handler = Callable[[dict[str, Any]], AsyncIterator[dict[str, Any]]]


@contextlib.contextmanager
def control_server(device: Device, handle: Handler) -> Iterator[list[dict[str, Any]]]:
    """A real control server for ``device``'s share, in a thread, holding the share's
    lock as a node does; yields the requests it received."""
    received: list[dict[str, Any]] = []
    ready, stop = threading.Event(), threading.Event()

    async def recording(request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        received.append(request)
        async for reply in handle(request):
            yield reply

    async def serve() -> None:
        async with control.serving(device.root, recording):
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.02)

    key = load_or_create_key(device.home)
    with Share.open(device.root, key, home=device.home):
        thread = threading.Thread(target=asyncio.run, args=(serve(),))
        thread.start()
        try:
            assert ready.wait(10)
            yield received
        finally:
            stop.set()
            thread.join(10)


@pytest.fixture
def device(tmp_path: Path) -> Device:
    device = Device(tmp_path, "a")
    device.root.mkdir()
    (device.root / "notes.txt").write_text("hello\n")
    device.run("init", str(device.root))
    return device


def test_a_nodes_error_reply_is_one_line_and_exit_status_1(device: Device) -> None:
    async def refuse(request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        yield {"error": f"cannot {request['op']} now: disk full"}

    with control_server(device, refuse) as received:
        for args in (("scan",), ("sync",), ("status",), ("device", "rename", "desk")):
            result = device.run(*args, "--share", "a", check=False)
            assert result.returncode == 1, args
            assert result.stderr == f"backer: error: cannot {received[-1]['op']} now: disk full\n"
    assert [r["op"] for r in received] == ["scan", "sync", "status", "rename"]
    assert received[1]["addresses"] == []
    assert received[3]["name"] == "desk"


def test_a_node_that_does_not_answer_is_one_clear_line(device: Device) -> None:
    """The control file names a live process (this test's) whose port takes no
    connection: the command says so rather than hanging or tracing back."""

    async def never(request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        yield {}

    with control_server(device, never):
        where = json.loads((device.root / ".backer" / "control").read_bytes())
        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            where["port"] = probe.getsockname()[1]
        (device.root / ".backer" / "control").write_text(json.dumps(where))
        for args in (("scan",), ("status",), ("sync", "127.0.0.1:9")):
            result = device.run(*args, "--share", "a", check=False)
            assert result.returncode == 1, args
            assert "does not answer" in result.stderr and result.stderr.count("\n") == 1, args


def test_without_a_control_channel_a_busy_share_still_says_in_use(device: Device) -> None:
    key = load_or_create_key(device.home)
    with Share.open(device.root, key, home=device.home):  # e.g. a long 'backer sync'
        result = device.run("scan", "--share", "a", check=False)
    assert result.returncode == 1 and "takes no requests" in result.stderr
    assert result.stderr.count("\n") == 1
