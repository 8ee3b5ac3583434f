"""The I/O edge: run a secure channel and a sync session over asyncio byte streams.

Everything above this module is sans-IO. Here bytes are read from a stream (TCP, a
child process's pipes, our own stdin/stdout), fed to the channel and the session,
and whatever they produce is written back. A protocol or channel error closes the
session with a reason (sent to the peer when the channel is up, and raised here).
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass

import nacl.signing

from .channel import HEADER_LEN, MODE_JOIN, MODE_SYNC, ChannelError, SecureChannel
from .errors import BackerError
from .session import Session
from .share import Share
from .wire import Error, FrameReader, Message, ProtocolError

READ_SIZE = 1 << 20
HANDSHAKE_TIMEOUT_S = 20.0


class SessionClosed(Exception):
    """The session ended early; the message says why."""


@dataclass
class Streams:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter | asyncio.WriteTransport
    close: Callable[[], None]


def _write(streams: Streams, data: bytes) -> None:
    if data:
        streams.writer.write(data)


async def _drain(streams: Streams) -> None:
    if isinstance(streams.writer, asyncio.StreamWriter):
        await streams.writer.drain()


async def run_session(
    streams: Streams,
    channel: SecureChannel,
    on_established: Callable[[SecureChannel], Session],
    one_shot: bool,
    progress: Callable[[Session], None] | None = None,
) -> Session:
    """Drive one connection to its end; return the session (raise SessionClosed)."""
    frames = FrameReader()
    session: Session | None = None

    def send(messages: list[Message]) -> None:
        if messages:
            channel.send(b"".join(m.encode() for m in messages))

    _write(streams, channel.data_to_send())
    try:
        while not (one_shot and session is not None and session.complete):
            timeout = None if channel.established else HANDSHAKE_TIMEOUT_S
            data = await asyncio.wait_for(streams.reader.read(READ_SIZE), timeout)
            if not data:
                if session is not None and not one_shot:
                    return session
                raise SessionClosed("the peer closed the connection")
            plaintext = channel.receive_data(data)
            if channel.established and session is None:
                session = on_established(channel)
                send(session.start())
            if session is not None:
                for message in frames.feed(plaintext):
                    send(session.receive(message))
                if progress is not None:
                    progress(session)
            _write(streams, channel.data_to_send())
            await _drain(streams)
    except (ChannelError, ProtocolError, BackerError) as exc:
        with contextlib.suppress(Exception):
            if channel.established:
                send([Error(str(exc).encode())])
                _write(streams, channel.data_to_send())
                await _drain(streams)
        raise SessionClosed(str(exc)) from exc
    except TimeoutError as exc:
        raise SessionClosed("the handshake timed out") from exc
    except (ConnectionError, OSError) as exc:
        raise SessionClosed(f"connection lost: {exc}") from exc
    finally:
        streams.close()
    assert session is not None
    return session


# -- the two ends -------------------------------------------------------------------------


def initiator(share: Share, key: nacl.signing.SigningKey) -> SecureChannel:
    """A channel that asks to sync the share with a member."""

    def check(peer: bytes, header: bytes) -> str | None:
        return None if share.is_member(peer) else "the peer is not a member of this share"

    return SecureChannel(key, check, header=MODE_SYNC + share.share_id, psk=share.share_key)


def responder(share: Share, key: nacl.signing.SigningKey) -> SecureChannel:
    """A channel that accepts members with the share key, or a joiner with a valid invite."""

    def lookup(header: bytes) -> bytes | None:
        mode, ident = header[:1], header[1:HEADER_LEN]
        if mode == MODE_SYNC and ident == share.share_id:
            return share.share_key
        if mode == MODE_JOIN:
            return share.invite_key(ident)
        return None

    def check(peer: bytes, header: bytes) -> str | None:
        if header[:1] == MODE_JOIN or share.is_member(peer):
            return None
        return "not a member of this share"

    return SecureChannel(key, check, lookup_psk=lookup)


def accept(share: Share, name: str) -> Callable[[SecureChannel], Session]:
    """Responder side once the channel is up: admit a joiner, then sync."""

    def established(channel: SecureChannel) -> Session:
        assert channel.peer is not None
        joining = channel.header[:1] == MODE_JOIN
        if joining and not share.is_member(channel.peer):
            share.admit(
                channel.peer, f"joined with invite {channel.header[1:5].hex()}", channel.header[1:]
            )
        share.scan()
        return Session(share, name, welcome=joining, peer=channel.peer)

    return established


def connect(share: Share, name: str) -> Callable[[SecureChannel], Session]:
    """Initiator side once the channel is up: scan, then sync."""

    def established(channel: SecureChannel) -> Session:
        share.scan()
        return Session(share, name, peer=channel.peer)

    return established


# -- streams --------------------------------------------------------------------------------


async def tcp_streams(host: str, port: int) -> Streams:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    except (OSError, TimeoutError) as exc:
        raise BackerError(f"cannot reach {host}:{port}: {exc or 'timed out'}") from exc
    return Streams(reader, writer, writer.close)


async def command_streams(command: str) -> Streams:
    """Speak to a child process (e.g. ``ssh host backer stdio DIR``) over its stdio."""
    try:
        process = await asyncio.create_subprocess_exec(
            *shlex.split(command),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise BackerError(f"cannot run {command!r}: {exc}") from exc
    assert process.stdin is not None and process.stdout is not None

    def close() -> None:
        if process.stdin is not None:
            process.stdin.close()

    return Streams(process.stdout, process.stdin, close)


async def stdio_streams() -> Streams:
    """Our own stdin/stdout as a byte stream (for ``backer stdio``)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_SIZE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    transport, _ = await loop.connect_write_pipe(asyncio.Protocol, sys.stdout.buffer)
    return Streams(reader, transport, transport.close)
