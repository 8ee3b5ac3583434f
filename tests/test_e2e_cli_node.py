"""Share commands while a node holds the share: they ask it over the control channel
and print its answers as they print their own results."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from backer.config.identity import load_or_create_key
from backer.connections import control
from backer.model.share import Share
from tests.e2e import Device, free_port, invite

Handler = Callable[[dict[str, Any]], AsyncIterator[dict[str, Any]]]


@contextlib.contextmanager
def control_server(
    device: Device, handle: Handler, starting_s: float = 0
) -> Iterator[list[dict[str, Any]]]:
    """A real control server for ``device``'s share, in a thread, holding the share's
    lock as a node does (and, with ``starting_s``, taking that long to start after
    saying it is starting); yields the requests it received."""
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
        if starting_s:
            control.announce_starting(device.root)
            threading.Timer(starting_s, thread.start).start()
        else:
            thread.start()
        try:
            assert starting_s or ready.wait(120)
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


def test_a_command_waits_for_a_node_that_is_still_starting(device: Device) -> None:
    """A node holds the share from the moment it opens it, but took requests only once
    it had started (seconds on a large share): a 'backer scan' typed then failed with
    "in use by another backer process"."""

    async def busy(request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        yield {"error": "the node answered"}

    with control_server(device, busy, starting_s=1.5) as received:
        began = time.monotonic()
        result = device.run("scan", "--share", "a", check=False)
        waited = time.monotonic() - began
    assert result.stderr == "backer: error: the node answered\n"
    assert [r["op"] for r in received] == ["scan"] and waited >= 1.0


def test_without_a_control_channel_a_busy_share_still_says_in_use(device: Device) -> None:
    key = load_or_create_key(device.home)
    with Share.open(device.root, key, home=device.home):  # e.g. a long 'backer sync'
        result = device.run("scan", "--share", "a", check=False)
    assert result.returncode == 1 and "takes no requests" in result.stderr
    assert result.stderr.count("\n") == 1


def _until(check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """Poll ``check`` (bounded in time) until it returns something true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


SCAN_LINE = re.compile(
    r"scanned in \d+\.\d\ds: \d+ added, \d+ modified, \d+ deleted, \d+ unchanged, "
    r"\d+ bytes hashed, 0 files failed"
)


def test_share_commands_ask_the_running_node_and_print_as_they_do_alone(tmp_path: Path) -> None:
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    a.root.mkdir()
    (a.root / "notes.txt").write_text("hello\n")
    a.run("init", str(a.root))
    alone = json.loads(a.run("scan", "--json", "--share", "a").stdout)
    port = free_port()
    with a.serving(port) as address:
        b.run("join", invite(a, address), str(b.root))
    b_id = b.run("id").stdout.strip()

    node_a, node_b = a.start(port), b.start()
    try:

        def b_connected() -> dict[str, Any] | None:
            report = json.loads(a.run("status", "--json", "--share", "a").stdout)
            found = next(d for d in report["devices"] if d["id"] == b_id)
            return found if found["connected"] and found["in_sync"] else None

        seen = _until(b_connected, "b connected to a's node and in sync")
        assert seen["address"] and seen["last_seen_ms"] and seen["transfer"] is None
        text = a.run("status", "--share", "a").stdout
        assert f"{b_id}  {socket.gethostname()}  (connected at " in text and "in sync" in text
        assert "(this device)" in text

        scanned = a.run("scan", "--share", "a")  # by the node: no "in use"
        assert SCAN_LINE.fullmatch(scanned.stdout.strip()), scanned.stdout
        as_json = json.loads(a.run("scan", "--json", "--share", "a").stdout)
        assert as_json.keys() == alone.keys()

        synced = a.run("sync", "--share", "a")
        assert synced.stdout.startswith(f"synced with {b_id[:7]}: events received ")
        assert json.loads(a.run("sync", "--json", "--share", "a").stdout)["errors"] == 0

        renamed = a.run("device", "rename", "desk", "--share", "a").stdout.strip()
        a_id = a.run("id").stdout.strip()
        assert renamed == f"renamed device {a_id} desk"
        _until(  # pushed by the node to the open session: no sync typed
            lambda: f"{a_id}  member   desk" in b.run("device", "list", "--share", "b").stdout,
            "the new name on b",
        )

        # read-only commands read the share beside the node
        assert "notes.txt" in a.run("log", "--share", "a").stdout
        assert a.run("history", str(a.root / "notes.txt"), "--share", "a").returncode == 0
        assert "verified 1 files" in a.run("verify", "--share", "a").stdout
        unknown = a.run("device", "remove", "AAAAAAA", "--share", "a", check=False)
        assert unknown.returncode == 1 and "matches no device" in unknown.stderr
        assert unknown.stderr.count("\n") == 1
    finally:
        node_b.stop()
        node_a.stop()

    offline = json.loads(b.run("status", "--json", "--share", "b").stdout)
    a_entry = next(d for d in offline["devices"] if d["id"] == a_id)
    assert a_entry["connected"] is False and a_entry["name"] == "desk"
    assert a_entry["last_seen_ms"] and a_entry["address"] == node_a.address
    assert "desk  (last seen " in b.run("status", "--share", "b").stdout


def test_a_node_started_while_another_process_holds_a_share_serves_it_once_free(
    device: Device,
) -> None:
    """The node opened each share once, at start: a share a 'backer sync' held then was
    never served until the node was restarted."""
    key = load_or_create_key(device.home)
    with Share.open(device.root, key, home=device.home):  # e.g. a long 'backer sync'
        node = device.start(wait=False, BACKER_TIME_SCALE="0.25")
        node.wait_for("served once it is free")
        time.sleep(1)  # a few tries, all refused
        assert "watching" not in node.log
    node.wait_for("free now: served")
    node.wait_for("watching")
    later = device.root / "later.txt"
    later.write_text("written once the node serves the share\n")

    def recorded() -> bool:  # by the node's watcher: nobody typed 'scan'
        shown = device.run("history", str(later), "--dir", str(device.root), check=False)
        return shown.returncode == 0

    _until(recorded, "the node to record later.txt")
    node.stop()
