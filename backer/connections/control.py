"""Ask the process that holds a share to act on it: the control channel.

Only one process may change a share at a time (its lock). A command that must change
the share while ``backer run`` holds it — ``scan``, ``status``, ``sync``, ``invite``,
``device remove`` — sends its request to the node instead: over TCP on 127.0.0.1, to
the port written with a random secret and the node's pid in ``.backer/control``
(mode 0600, so only the share's owner can read it). One JSON object per line each way:

1. the server sends a challenge (a random nonce);
2. the client sends its request with its own nonce and an HMAC of both nonces under
   the secret (the secret itself never crosses the socket);
3. the server answers first with an HMAC of both nonces the other way round, then its
   replies, and closes.

Each side thus proves it knows the secret, so a local process that took the port of a
node that died cannot answer ``invite`` with a token of its choosing; and a
control file whose pid is not alive is removed as stale.

Any local user can connect (the port is in ``/proc/net/tcp``): at most
:data:`MAX_UNPROVEN` connections wait for their proof at a time, the oldest closed to
make room (an owner's command proves itself within milliseconds), so connections
opened faster than they time out cannot take the node's descriptors (R51).

A node writes the file with its pid and no port as soon as it holds the share, while
it still opens it and starts: a command then waits for the port (up to
``STARTING_WAIT_S``) instead of failing with "in use".
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from backer.connections.limits import Admission
from backer.errors import BackerError
from backer.fs.paths import METADATA_DIR

CONTROL_FILE = "control"
MAX_REQUEST = 64 * 1024
MAX_UNPROVEN = 32  # connections that have not proved the secret yet (the oldest goes first)
STARTING_WAIT_S = 60.0  # how long a command waits for a starting node to take requests

Handler = Callable[[dict[str, Any]], AsyncIterator[dict[str, Any]]]


def _write_private(path: Path, data: bytes) -> None:
    """Write ``path`` (mode 0600) by a fresh temp file: never through a link left there."""
    temp = path.with_name(path.name + ".tmp")
    temp.unlink(missing_ok=True)  # a crash's leftover, or a link: removed, not followed
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(temp, path)


def announce_starting(root: Path) -> None:
    """Say (``.backer/control`` with this pid, no port yet) that the process holding the
    share will take requests once it has started."""
    _write_private(root / METADATA_DIR / CONTROL_FILE, json.dumps({"pid": os.getpid()}).encode())


def _read_where(root: Path, busy: BackerError) -> dict[str, Any]:
    """The control file's contents, once it names a port: a node still starting is
    waited for while its pid lives (``STARTING_WAIT_S`` at most)."""
    path = root / METADATA_DIR / CONTROL_FILE
    deadline = time.monotonic() + STARTING_WAIT_S
    while True:
        try:
            where = json.loads(path.read_bytes())
            pid = int(where["pid"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise busy from exc
        if not _alive(pid):
            path.unlink(missing_ok=True)  # left by a node that was killed
            raise busy
        if "port" in where or time.monotonic() > deadline:
            return where
        time.sleep(0.1)


def _proof(secret: str, who: bytes, first: str, second: str) -> str:
    """What proves knowledge of the secret for this pair of nonces, from ``who``."""
    message = who + bytes.fromhex(first) + bytes.fromhex(second)
    return hmac.new(bytes.fromhex(secret), message, hashlib.sha256).hexdigest()


async def _read_json(reader: asyncio.StreamReader) -> dict[str, Any]:
    line = await asyncio.wait_for(reader.readline(), 10)
    value = json.loads(line[:MAX_REQUEST] or b"{}")
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


@contextlib.asynccontextmanager
async def serving(root: Path, handle: Handler) -> AsyncIterator[None]:
    """Answer control requests for the share at ``root`` while the block runs."""
    secret = secrets.token_hex(32)

    answering: set[asyncio.Task[None]] = set()  # cancelled when the block ends
    unproven = Admission(MAX_UNPROVEN, MAX_UNPROVEN)  # (all come from 127.0.0.1)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        answering.add(task)
        ticket = unproven.enter("", writer.transport.abort)
        challenge = secrets.token_hex(16)

        def send(reply: dict[str, Any]) -> None:
            writer.write(json.dumps(reply).encode() + b"\n")

        try:
            send({"challenge": challenge})
            request = await _read_json(reader)
            nonce = str(request.pop("nonce", ""))
            expected = _proof(secret, b"client", challenge, nonce)
            if not hmac.compare_digest(str(request.pop("proof", "")), expected):
                send({"error": "not authorized"})
                return
            unproven.leave(ticket)
            send({"proof": _proof(secret, b"server", nonce, challenge)})
            async for reply in handle(request):
                send(reply)
                await writer.drain()
            send({"done": True})  # a request closed without it was not answered
            await writer.drain()
        except (OSError, ValueError, TimeoutError):
            pass  # a broken request only ends its own connection
        finally:
            unproven.leave(ticket)
            writer.close()
            answering.discard(task)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    path = root / METADATA_DIR / CONTROL_FILE
    port = server.sockets[0].getsockname()[1]
    where = {"port": port, "secret": secret, "pid": os.getpid()}
    async with server:  # (closed also when the file cannot be written)
        try:
            _write_private(path, json.dumps(where).encode())
            yield
        finally:
            path.unlink(missing_ok=True)
            for task in answering:
                task.cancel()
            await asyncio.gather(*answering, return_exceptions=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def answering(root: Path) -> bool:
    """Whether a live process says it takes control requests for the share at ``root``."""
    try:
        return _alive(int(json.loads((root / METADATA_DIR / CONTROL_FILE).read_bytes())["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def request(root: Path, message: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Send ``message`` to the process serving the share at ``root``; yield its replies."""
    busy = BackerError(
        f"the share {root} is in use by another backer process that takes no requests"
    )
    where = _read_where(root, busy)
    pid = int(where["pid"])
    silent = f"the backer process serving the share {root} (pid {pid}) does not answer"
    try:
        port, secret = int(where["port"]), str(where["secret"])
        bytes.fromhex(secret)
    except (ValueError, KeyError, TypeError) as exc:
        raise BackerError(f"{silent}: it has not finished starting") from exc
    try:
        connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError as exc:
        raise BackerError(f"{silent}: {exc.strerror or exc}") from exc
    impostor = BackerError(
        f"the process answering for the share {root} does not know its control secret: "
        "its answer was ignored"
    )
    with connection, connection.makefile("rwb") as stream:
        try:
            challenge = str(json.loads(stream.readline())["challenge"])
            nonce = secrets.token_hex(16)
            proof = _proof(secret, b"client", challenge, nonce)
            stream.write(json.dumps({**message, "nonce": nonce, "proof": proof}).encode() + b"\n")
            stream.flush()
            answer = json.loads(stream.readline())
        except TimeoutError as exc:
            raise BackerError(silent) from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise impostor from exc
        if "error" in answer:
            raise BackerError(str(answer["error"]))
        if not hmac.compare_digest(
            str(answer.get("proof", "")), _proof(secret, b"server", nonce, challenge)
        ):
            raise impostor
        connection.settimeout(None)  # a waiting request ends when the server says so
        for line in stream:
            reply = json.loads(line)
            if "error" in reply:
                raise BackerError(str(reply["error"]))
            if reply.get("done"):
                return
            yield reply
    raise BackerError(
        f"the backer process serving the share {root} (pid {pid}) closed the request "
        "unanswered (see its log)"
    )
