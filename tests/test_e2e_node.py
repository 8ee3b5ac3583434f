"""Three devices each running ``backer run`` over TCP on 127.0.0.1: changes reach the
others with no command typed, through crashes, stops, simultaneous dials and downtime."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest

from backer.connections import control
from backer.errors import BackerError
from backer.fs.paths import METADATA_DIR
from backer.scanner.ignore import is_temp_name
from tests.e2e import Device, Node, free_port, invite, snapshot, wait_until
from tests.helpers import timing

WAIT_S = 120  # (a wait for a state: on a loaded machine convergence took over 30 s)
OPENED = re.compile(r" open \([^,]+, (dialled|accepted)\)$")


def converged(devices: list[Device], timeout: float = WAIT_S) -> dict[str, tuple]:
    """Wait until every device's folder is the same; that folder."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            views = [snapshot(d.root) for d in devices]
        except FileNotFoundError:  # a temp file renamed into place while listed
            continue
        if all(v == views[0] for v in views[1:]):
            return views[0]
        if time.monotonic() > deadline:
            differing = {
                path
                for view in views
                for path in view
                if any(other.get(path) != view[path] for other in views)
            }
            logs = "\n".join(
                f"--- {n.device.root.name}:\n{n.log}" for d in devices for n in d.nodes
            )
            raise AssertionError(f"not converged after {timeout} s: {sorted(differing)}\n{logs}")
        time.sleep(0.1)


def status(device: Device) -> dict:
    """The running node's status of the device's share (over the control channel)."""
    return ask(device, {"op": "status"})["status"]


def own_id(device: Device) -> str:
    """The device id, read from its share (its node need not run)."""
    return json.loads(device.run("status", "--json", "--dir", str(device.root)).stdout)["device"]


def ask(device: Device, request: dict) -> dict:
    """The running node's (first) reply to ``request``."""
    return next(iter(control.request(device.root, request)))


def authored(device: Device) -> dict[str, int]:
    """How many events of the device's journal each author signed."""
    events = json.loads(device.run("log", "--json", "--dir", str(device.root)).stdout)
    counts: dict[str, int] = {}
    for event in events:
        counts[event["author"]] = counts.get(event["author"], 0) + 1
    return counts


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[tuple[Device, Device, Device]]:
    """a founded the share; b and c joined it and know a's address; all three run."""
    a, b, c = (Device(tmp_path, name) for name in "abc")
    a.root.mkdir()
    (a.root / "readme.txt").write_text("hello\n")
    hour_ago = time.time() - 3600  # (a file written under 2 s ago is read by every scan
    os.utime(a.root / "readme.txt", (hour_ago, hour_ago))  # until it settles)
    a.run("init", str(a.root))
    port = free_port()
    tokens = [invite(a, f"127.0.0.1:{port}") for _ in range(2)]
    a.start(port)
    b.run("join", tokens[0], str(b.root))
    c.run("join", tokens[1], str(c.root))
    b.start()
    c.start()
    try:
        yield a, b, c
    finally:
        for device in (a, b, c):
            for node in list(device.nodes):
                node.stop()


def test_creates_edits_renames_and_deletes_on_each_reach_the_others(trio) -> None:
    a, b, c = trio
    converged([a, b, c])
    (a.root / "from-a.txt").write_text("a\n")
    (b.root / "dir").mkdir()
    (b.root / "dir" / "from-b.txt").write_text("b\n")
    (c.root / "readme.txt").write_text("hello from c\n")
    view = converged([a, b, c])
    assert view["dir/from-b.txt"][1] == b"b\n" and view["readme.txt"][1] == b"hello from c\n"
    (b.root / "from-a.txt").rename(b.root / "renamed.txt")
    (c.root / "dir" / "from-b.txt").unlink()
    (a.root / "readme.txt").write_text("hello again\n")
    view = converged([a, b, c])
    assert "from-a.txt" not in view and view["renamed.txt"][1] == b"a\n"
    assert "dir/from-b.txt" not in view and view["readme.txt"][1] == b"hello again\n"
    devices = status(a)["devices"]
    assert sorted(d["connected"] for d in devices) == [False, True, True]  # (itself: False)
    deadline = time.monotonic() + WAIT_S
    while not all(d["in_sync"] for d in devices if d["connected"]):
        assert time.monotonic() < deadline, devices
        time.sleep(0.1)
        devices = status(a)["devices"]
    assert all(d["address"] and d["last_seen_ms"] for d in devices if d["connected"]), devices


def test_a_node_killed_while_others_edit_converges_when_restarted(trio) -> None:
    a, b, c = trio
    converged([a, b, c])
    b.nodes[0].stop(signal.SIGKILL)
    for n in range(20):
        (a.root / f"a{n}.txt").write_text(f"a {n}\n")
        (c.root / f"c{n}.txt").write_text(f"c {n}\n" * 1000)
    converged([a, c])
    b.start()
    view = converged([a, b, c])
    assert len([p for p in view if p.startswith(("a", "c"))]) == 40


def test_a_laptop_away_while_all_edit_the_same_files_gets_identical_conflict_copies(
    trio,
) -> None:
    a, b, c = trio
    converged([a, b, c])
    assert c.nodes[0].stop() == 0
    (away,) = [d for d in status(a)["devices"] if d["id"] == own_id(c)]
    assert not away["connected"] and away["last_seen_ms"], away
    (c.root / "readme.txt").write_text("c was offline\n")
    (c.root / "notes.txt").write_text("c's notes\n")
    (a.root / "readme.txt").write_text("a stayed\n")
    converged([a, b])
    (b.root / "notes.txt").write_text("b's notes\n")
    converged([a, b])
    c.start()
    view = converged([a, b, c])
    readmes = sorted(content[1] for path, content in view.items() if "readme" in path)
    notes = sorted(content[1] for path, content in view.items() if "notes" in path)
    assert readmes == [b"a stayed\n", b"c was offline\n"], view.keys()
    assert notes == [b"b's notes\n", b"c's notes\n"], view.keys()


def test_a_nodes_own_writes_are_not_recorded_again(trio) -> None:
    a, b, c = trio
    converged([a, b, c])
    ids = {device: status(device)["device"] for device in (b, c)}
    before = {device: authored(device).get(ids[device], 0) for device in (b, c)}
    for n in range(30):
        (a.root / f"f{n}.txt").write_text(f"{n}\n" * n)
    converged([a, b, c])
    time.sleep(3)  # b and c wrote a's files: their watchers saw every one of them
    for device in (b, c):  # nothing new of theirs: no edit was made there
        assert authored(device).get(ids[device], 0) == before[device]
    assert authored(a) == authored(b) == authored(c)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Device, Device, int, int]]:
    """a and b, each with the other's address remembered (so both dial at start), and
    their ports; no node runs yet."""
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    a.root.mkdir()
    a.run("init", str(a.root))
    a_port, b_port = free_port(), free_port()
    token = invite(a, f"127.0.0.1:{a_port}")
    with a.serving(a_port):
        b.run("join", token, str(b.root))
    with b.serving(b_port):
        a.run("sync", f"127.0.0.1:{b_port}", "--dir", str(a.root))
    try:
        yield a, b, a_port, b_port
    finally:
        for device in (a, b):
            for node in list(device.nodes):
                node.stop()


def _sessions_open(node: Node) -> int:
    """Sessions the node holds now, by its log: opened minus ended."""
    lines = list(node.lines)
    opened = sum(bool(OPENED.search(line)) for line in lines)  # (not a refusal's "already
    return opened - sum(" ended: " in line for line in lines)  # open (...)")


def test_simultaneous_dials_leave_one_session(pair) -> None:
    a, b, a_port, b_port = pair
    for _ in range(3):
        nodes = [a.start(a_port, wait=False), b.start(b_port, wait=False)]
        for node in nodes:
            node.wait_for(" open (")
        time.sleep(1.5)  # any duplicate is settled by now
        assert [_sessions_open(node) for node in nodes] == [1, 1], "\n".join(n.log for n in nodes)
        (a.root / "x.txt").write_text(str(time.time()))
        converged([a, b])
        for node in nodes:
            assert node.stop() == 0


@timing
def test_a_peer_down_30_s_is_dialled_a_bounded_number_of_times(pair) -> None:
    a, b, a_port, _ = pair
    scale = 0.2  # 30 s of the node's time in 6 s
    node = b.start(BACKER_TIME_SCALE=str(scale))
    process = psutil.Process(node.process.pid)
    cpu_before = sum(process.cpu_times()[:2])
    time.sleep(30 * scale)
    attempts = sum(f"dialling 127.0.0.1:{a_port}" in line for line in node.lines)
    cpu = sum(process.cpu_times()[:2]) - cpu_before
    assert 3 <= attempts <= 9, node.log
    assert cpu < 30 * scale * 0.5, cpu  # waiting, not spinning
    (seen,) = [d for d in status(b)["devices"] if not d["this"]]  # as when last dialled
    assert not seen["connected"] and seen["last_seen_ms"] and seen["in_sync"] is None
    assert seen["address"] == f"127.0.0.1:{a_port}"
    (a.root / "back.txt").write_text("a is back\n")
    a.start(a_port)
    converged([a, b], timeout=60 * scale + 10)  # within one capped backoff


@timing
def test_sigterm_mid_transfer_exits_0_within_5_s_and_leaves_no_temp_file(trio) -> None:
    a, b, c = trio
    converged([a, b, c])
    c.nodes[0].stop()
    with open(a.root / "big.bin", "wb") as big:
        for _ in range(64):
            big.write(os.urandom(4 << 20))
    deadline = time.monotonic() + WAIT_S
    temps: list[Path] = []
    while not temps and time.monotonic() < deadline:
        temps = [p for p in b.root.rglob("*") if is_temp_name(p.name)]
        time.sleep(0.005)
    assert temps, "b never started the transfer"
    started = time.monotonic()
    status_code = b.nodes[0].stop()
    took = time.monotonic() - started
    assert status_code == 0 and took < 5, (status_code, took)
    assert not [p for p in b.root.rglob("*") if is_temp_name(p.name)]
    shut = "the device is shutting down"  # (a logs it once it has read b's close)
    wait_until(lambda: shut in a.nodes[0].log, [a.nodes[0]])
    b.start()
    converged([a, b])


def test_the_node_answers_scan_sync_rename_and_remove_on_the_control_channel(trio) -> None:
    a, b, c = trio
    converged([a, b, c])
    (b.root / "new.txt").write_text("scanned on request\n")
    scanned = ask(b, {"op": "scan"})["scan"]  # (the watcher may have recorded it first)
    assert scanned["unchanged"] >= 1 and scanned["problems"] == []
    synced = ask(b, {"op": "sync", "addresses": [a.nodes[0].address]})["sync"]
    assert synced["peers"] == [status(a)["device"]] and synced["errors"] == 0
    assert (a.root / "new.txt").read_text() == "scanned on request\n"  # caught up, applied
    renamed = ask(b, {"op": "rename", "device": status(b)["device"], "name": "laptop"})
    assert renamed["renamed"].endswith(" laptop")
    deadline = time.monotonic() + WAIT_S
    while "laptop" not in [d["name"] for d in status(a)["devices"]]:
        assert time.monotonic() < deadline, status(a)["devices"]
        time.sleep(0.1)
    c_id = status(c)["device"]
    assert "removed device" in ask(a, {"op": "remove", "device": c_id})["removed"]
    deadline = time.monotonic() + WAIT_S
    while any(d["id"] == c_id for d in status(b)["devices"]):  # relayed at once
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with pytest.raises(BackerError, match="unknown request"):
        list(control.request(a.root, {"op": "nonsense"}))


def test_a_removed_device_is_dropped_by_every_member_and_backs_off(trio) -> None:
    """Members that heard of a removal kept their open session with the removed device,
    and it redialled every ~0.4 s: its handshake completed before the refusal, which
    reset its backoff."""
    a, b, c = trio
    converged([a, b, c])
    synced = ask(c, {"op": "sync", "addresses": [b.nodes[0].address]})["sync"]
    assert status(b)["device"] in synced["peers"]  # c now holds a session with b too
    c_node = c.nodes[0]
    ask(a, {"op": "remove", "device": status(c)["device"]})
    deadline = time.monotonic() + WAIT_S
    while any(d["connected"] for d in status(c)["devices"]):  # a drops it, and b as soon
        assert time.monotonic() < deadline, c_node.log  # as the removal is relayed
        time.sleep(0.1)
    seen = len(c_node.lines)
    time.sleep(5)
    attempts = sum(" dialling " in line for line in list(c_node.lines)[seen:])
    assert attempts <= 10, c_node.log  # two addresses, backing off (was ~25)


def test_R30_a_request_the_node_fails_on_is_answered_with_an_error_and_logged_once(
    tmp_path: Path,
) -> None:
    """A request whose handling raised what no check foresaw killed the control handler
    (an asyncio warning) and the CLI printed nothing and exited 0."""
    a = Device(tmp_path, "a")
    a.root.mkdir()
    a.run("init", str(a.root))
    node = a.start()
    try:
        with pytest.raises(BackerError, match="has no attribute"):
            list(control.request(a.root, {"op": "sync", "addresses": [5]}))
        assert status(a)["device"]  # the node still answers
        node.wait_for("sync failed: AttributeError")
        assert node.log.count("sync failed") == 1 and "Unhandled exception" not in node.log
    finally:
        node.stop()


def test_R30_a_request_closed_unanswered_fails_the_client(tmp_path: Path) -> None:
    """The client fails (one line) when the serving process closes a request without its
    end; it used to take that for a request answered with nothing."""
    (tmp_path / METADATA_DIR).mkdir()

    async def dies(request: dict) -> AsyncIterator[dict]:
        yield {"status": "first"}
        raise RuntimeError("broken handler")

    async def main() -> list[dict]:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda *_: None)  # the handler's death is the point
        async with control.serving(tmp_path, dies):
            return await asyncio.to_thread(lambda: list(control.request(tmp_path, {})))

    with pytest.raises(BackerError, match="closed the request unanswered"):
        asyncio.run(main())


def test_R51_connections_that_never_prove_the_control_secret_cannot_take_the_nodes_descriptors(
    tmp_path: Path,
) -> None:
    """Any user of the machine can connect to the control port (listed in
    /proc/net/tcp); each connection used to be held, with up to 64 KiB of what it sent,
    until its request line came or 10 s passed: connections opened faster than that took
    every descriptor of the node, and its memory with them."""
    device = Device(tmp_path, "solo")
    device.root.mkdir()
    device.run("init", str(device.root))
    node = device.start()
    flood: list[socket.socket] = []
    try:
        port = json.loads((device.root / METADATA_DIR / control.CONTROL_FILE).read_text())["port"]
        fds = Path(f"/proc/{node.process.pid}/fd")
        before = len(list(fds.iterdir()))
        for _ in range(1_000):
            connection = socket.create_connection(("127.0.0.1", port), timeout=5)
            connection.sendall(b"x" * 60_000)  # no end of line: a request still coming
            flood.append(connection)
        time.sleep(1)  # let the node accept them all
        assert len(list(fds.iterdir())) <= before + control.MAX_UNPROVEN + 4
        assert "solo" in device.run("status", "--dir", str(device.root)).stdout
    finally:
        for connection in flood:
            connection.close()
        node.stop()
