"""A device that closes a session while its peer is busy sending (a shutdown mid-
transfer) still gets its reason read: closed with the peer's data unread, the socket
would reset the connection, and the peer would lose the reason with it. While it waits
for the peer to close, nothing else writes to that connection."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from backer.connections.transport import (
    Hangup,
    Hub,
    SessionClosed,
    Streams,
    _say_goodbye,
    initiator,
    responder,
    tcp_streams,
)
from tests.helpers import make_devices, sync

REASON = b"the device is shutting down"


async def _close_while_the_peer_sends(goodbye: bool) -> bytes | Exception:
    heard: list[bytes | Exception] = []

    async def busy_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(400):  # 25 MiB, more than the socket buffers hold
                writer.write(b"x" * 65536)
                await writer.drain()
        except ConnectionError:
            pass
        try:
            heard.append(await reader.read())
        except ConnectionError as exc:
            heard.append(exc)
        writer.close()

    server = await asyncio.start_server(busy_peer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.read(65536)  # the transfer is under way
    writer.write(REASON)
    if goodbye:
        await _say_goodbye(Streams(reader, writer, writer.close), None)
    writer.close()
    for _ in range(200):
        if heard:
            break
        await asyncio.sleep(0.01)
    server.close()
    return heard[0]


def test_a_peer_busy_sending_reads_the_reason_for_closing() -> None:
    assert asyncio.run(_close_while_the_peer_sends(goodbye=True)) == REASON


def test_without_a_goodbye_the_busy_peer_loses_the_reason() -> None:
    """What the goodbye is for: a plain close resets the connection."""
    heard = asyncio.run(_close_while_the_peer_sends(goodbye=False))
    assert isinstance(heard, ConnectionResetError), heard


def test_a_session_saying_goodbye_is_not_flushed_by_the_others(tmp_path: Path) -> None:
    """A session closed as a duplicate stays in its goodbye until the peer closes (up
    to GOODBYE_S); whatever the other sessions of the share flushed in that time was
    written to its half-closed socket, and *their* step failed: "internal error:
    RuntimeError: Cannot call write() after write_eof()"."""
    a, b = make_devices(tmp_path, 2)
    sync(a, b)

    async def scenario() -> SessionClosed:
        served, hangup = Hub(a, "a"), Hangup()
        ended: asyncio.Future[SessionClosed] = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            streams = Streams(reader, writer, writer.close)
            try:
                await served.run(streams, responder(a, a.key), served.accept, False, hangup=hangup)
            except SessionClosed as exc:
                ended.set_result(exc)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        hub = Hub(b, "b")
        opened = await tcp_streams("127.0.0.1", server.sockets[0].getsockname()[1])
        kept_open = Streams(opened.reader, opened.writer, lambda: None)  # never closes
        dialled = asyncio.create_task(hub.run(kept_open, initiator(b, b.key), hub.connect, False))
        await asyncio.sleep(0.5)  # open, both caught up
        hangup("replaced by a newer session")
        with contextlib.suppress(SessionClosed):
            await asyncio.wait_for(dialled, 5)  # b read the reason; a waits in its goodbye
        (a.root / "new.txt").write_text("recorded while the other session says goodbye")
        served.scan()  # flushes every session of the share
        closed = await asyncio.wait_for(ended, 5)
        opened.writer.close()
        server.close()
        return closed

    closed = asyncio.run(scenario())
    assert str(closed) == "replaced by a newer session" and not closed.failed
