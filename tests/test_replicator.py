"""One device, several peers at once: chunks spread over them, lost or lacking peers are
worked around, and events one peer brings are relayed to the others."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from backer.connections import transport
from backer.model.replicator import Replicator
from backer.model.share import Share
from backer.protocol.session import Session
from backer.protocol.wire import Need, Ping, WantChunks, WantManifests
from backer.scanner.ignore import is_temp_name
from tests.helpers import Links, exchange, make_devices, sync, tree

SIZE = 6 * 1024 * 1024


def _two_full_one_empty(tmp_path: Path) -> tuple[Share, Share, Share, bytes]:
    a, b, c = make_devices(tmp_path, 3)
    data = os.urandom(SIZE)
    (a.root / "big.bin").write_bytes(data)
    sync(a, b)
    return a, b, c, data


def _fetching_from(c: Share, *peers: Share) -> tuple[Links, list[Session]]:
    """Sessions from ``c`` to each peer, sharing one replicator on ``c``."""
    replicator = Replicator(c)
    mine = [Session(c, "c", replicator=replicator) for _ in peers]
    return Links([(m, Session(p, p.root.name)) for m, p in zip(mine, peers, strict=True)]), mine


def test_chunks_are_spread_over_every_connected_peer_and_fetched_once(tmp_path: Path) -> None:
    a, b, c, data = _two_full_one_empty(tmp_path)
    links, (from_a, from_b) = _fetching_from(c, a, b)
    links.run()
    assert (c.root / "big.bin").read_bytes() == data
    received = [from_a.stats.chunk_bytes_received, from_b.stats.chunk_bytes_received]
    assert min(received) > SIZE // 4, received
    assert sum(received) == SIZE
    assert from_a.complete and from_b.complete


def test_a_peer_lost_mid_transfer_leaves_its_chunks_to_the_others(tmp_path: Path) -> None:
    a, b, c, data = _two_full_one_empty(tmp_path)
    links, (from_a, from_b) = _fetching_from(c, a, b)
    for _ in range(1000):
        links.step()
        if from_b.stats.chunk_bytes_received:
            break
    assert 0 < from_b.stats.chunk_bytes_received < SIZE
    links.drop(1)
    links.run()
    assert (c.root / "big.bin").read_bytes() == data
    assert from_a.complete


def test_a_peer_without_the_content_is_skipped_for_one_that_has_it(tmp_path: Path) -> None:
    a, b, c = make_devices(tmp_path, 3)
    data = os.urandom(SIZE)
    (a.root / "big.bin").write_bytes(data)
    a.scan()
    links, (from_b, from_a) = _fetching_from(c, b, a)  # the empty peer is asked first
    links.run()
    assert (c.root / "big.bin").read_bytes() == data
    assert from_b.stats.chunk_bytes_received == 0
    assert from_a.stats.chunk_bytes_received == SIZE


def test_a_relaying_peer_passes_events_on_and_content_follows(tmp_path: Path) -> None:
    """a - b - c in a line, sessions kept open: a's new file reaches c through b, even
    though c hears of it before b has its bytes."""
    a, b, c = make_devices(tmp_path, 3)
    hub = Replicator(b)
    a_b, b_a = Session(a, "a"), Session(b, "b", replicator=hub)
    b_c, c_b = Session(b, "b", replicator=hub), Session(c, "c")
    links = Links([(a_b, b_a), (b_c, c_b)])
    links.run()
    data = os.urandom(SIZE)
    (a.root / "new.bin").write_bytes(data)
    a.scan()
    a_b.push()
    links.run()
    assert (c.root / "new.bin").read_bytes() == data
    assert tree(a.root) == tree(b.root) == tree(c.root)
    assert not [r.errors for r in c_b.replicator.reports if r.errors]  # it waited, not failed


def test_serve_relays_live_over_tcp_between_two_open_sessions(tmp_path: Path) -> None:
    a, b, c = make_devices(tmp_path, 3)
    sync(a, b)
    sync(a, c)  # they know the members now

    async def scenario() -> None:
        served = transport.Hub(a, "a")

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            streams = transport.Streams(reader, writer, writer.close)
            await served.run(streams, transport.responder(a, a.key), served.accept, False)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        hubs = {b: transport.Hub(b, "b"), c: transport.Hub(c, "c")}
        tasks = []
        for share, hub in hubs.items():
            streams = await transport.tcp_streams("127.0.0.1", port)
            channel = transport.initiator(share, share.key)
            tasks.append(asyncio.create_task(hub.run(streams, channel, hub.connect, False)))
        await _until(lambda: all(len(h.replicator.sessions) == 1 for h in hubs.values()))
        (b.root / "live.txt").write_text("typed on b")
        hubs[b].scan()  # what a file watcher would trigger
        await _until(lambda: (c.root / "live.txt").exists())
        assert (c.root / "live.txt").read_text() == "typed on b"
        for task in tasks:
            task.cancel()
        server.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


async def _until(condition: object, seconds: float = 20) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


def test_a_plan_larger_than_a_window_is_applied_window_by_window(
    tmp_path: Path, monkeypatch
) -> None:
    import backer.model.replicator

    monkeypatch.setattr(backer.model.replicator, "WINDOW_FILES", 7)
    a, b = make_devices(tmp_path, 2)
    for n in range(30):
        (a.root / f"d{n % 3}").mkdir(exist_ok=True)
        (a.root / f"d{n % 3}" / f"{n}.bin").write_bytes(os.urandom(3000 + n))
    _, right = sync(a, b)
    assert tree(a.root) == tree(b.root)
    assert len(right.replicator.reports) >= 30 // 7  # one report per window
    for n in range(0, 30, 2):
        (a.root / f"d{n % 3}" / f"{n}.bin").unlink()
    _, right = sync(a, b)
    assert tree(a.root) == tree(b.root)


def test_a_version_no_connected_device_holds_keeps_no_temp_and_is_reported(
    tmp_path: Path,
) -> None:
    """A file whose chunks every connected device lacks is a problem to show, not a
    transfer to resume: its temp was kept for a retry that nobody could ever complete
    (its only copy was rewritten in place on its author's device: its other chunks came),
    for ever."""
    a, b = make_devices(tmp_path, 2)
    sync(a, b)
    (a.root / "f.bin").write_bytes(os.urandom(300_000))
    a.scan()
    with (a.root / "f.bin").open("r+b") as rewritten:  # its end, in place, not scanned
        rewritten.seek(299_000)
        rewritten.write(os.urandom(1000))
    left, right = Session(a, "a"), Session(b, "b")
    Links([(left, right)]).run()
    assert not (b.root / "f.bin").exists()
    assert not [p for p in b.root.iterdir() if is_temp_name(p.name)]
    problems = {problem.path: problem.reason for _, problem, _ in b.catalog.problems()}
    assert "no connected device has its bytes" in problems["f.bin"]
    assert right.replicator.need() == (1, 300_000)  # not in sync
    sync(a, b)  # a records what its disk holds now: that version arrives
    assert tree(a.root) == tree(b.root)
    assert not b.catalog.problems()


def test_R71_a_device_applying_a_peers_events_keeps_it_told_not_pinged(tmp_path: Path) -> None:
    """While the events a peer sent wait to be applied here (their file's chunks asked
    and not in yet: from a third device that holds them back, say), the keepalive is
    this device's Need, not a Ping: the peer's acknowledgement deadline counts only
    Pings, and cut an honest device for what another one withheld. Once applied and
    acknowledged (Done), the keepalive is a Ping again."""
    a, b = make_devices(tmp_path, 2)
    (a.root / "f").write_bytes(os.urandom(200_000))
    a.scan()
    sa, sb = Session(a, "a"), Session(b, "b")
    to_b = [reply for message in sb.start() for reply in sa.receive(message)]
    to_b[:0] = sa.start()
    requests = [request for message in to_b for request in sb.receive(message)]
    assert any(isinstance(r, WantManifests | WantChunks) for r in requests), requests
    assert isinstance(sb.keepalive(), Need)
    exchange(sa, sb, [], requests)
    assert (b.root / "f").read_bytes() == (a.root / "f").read_bytes()
    assert isinstance(sb.keepalive(), Ping)
    assert isinstance(sa.keepalive(), Ping)
