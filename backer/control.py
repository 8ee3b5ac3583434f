"""Ask the process that holds a share to act on it: the control channel.

Only one process may change a share at a time (its lock). A command that must change
the share while ``serve`` holds it — ``invite`` — sends its request to ``serve``
instead: over TCP on 127.0.0.1, to the port written with a random secret in
``.backer/control`` (mode 0600, so only the share's owner can read it). One JSON object
per line each way; the request carries the secret, the server answers with one or more
lines and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import BackerError
from .paths import METADATA_DIR

CONTROL_FILE = "control"
MAX_REQUEST = 64 * 1024

Handler = Callable[[dict[str, Any]], AsyncIterator[dict[str, Any]]]


def _write_private(path: Path, data: bytes) -> None:
    temp = path.with_name(path.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(temp, path)


@contextlib.asynccontextmanager
async def serving(root: Path, handle: Handler) -> AsyncIterator[None]:
    """Answer control requests for the share at ``root`` while the block runs."""
    secret = secrets.token_hex(16)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            request = json.loads(line[:MAX_REQUEST] or b"{}")
            if not isinstance(request, dict) or not hmac.compare_digest(
                str(request.pop("secret", "")), secret
            ):
                replies: AsyncIterator[dict[str, Any]] = _one({"error": "not authorized"})
            else:
                replies = handle(request)
            async for reply in replies:
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (OSError, ValueError, TimeoutError):
            pass  # a broken request only ends its own connection
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    path = root / METADATA_DIR / CONTROL_FILE
    port = server.sockets[0].getsockname()[1]
    _write_private(path, json.dumps({"port": port, "secret": secret}).encode())
    try:
        async with server:
            yield
    finally:
        path.unlink(missing_ok=True)


async def _one(reply: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    yield reply


def request(root: Path, message: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Send ``message`` to the process serving the share at ``root``; yield its replies."""
    try:
        where = json.loads((root / METADATA_DIR / CONTROL_FILE).read_bytes())
        connection = socket.create_connection(("127.0.0.1", int(where["port"])), timeout=10)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BackerError(
            f"the share {root} is in use by another backer process that takes no requests"
        ) from exc
    with connection, connection.makefile("rwb") as stream:
        stream.write(json.dumps({**message, "secret": where["secret"]}).encode() + b"\n")
        stream.flush()
        connection.settimeout(None)  # a waiting request ends when the server says so
        for line in stream:
            reply = json.loads(line)
            if "error" in reply:
                raise BackerError(str(reply["error"]))
            yield reply
