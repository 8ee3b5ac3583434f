"""A device that closes a session while its peer is busy sending (a shutdown mid-
transfer) still gets its reason read: closed with the peer's data unread, the socket
would reset the connection, and the peer would lose the reason with it."""

from __future__ import annotations

import asyncio

from backer.connections.transport import Streams, _say_goodbye

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
