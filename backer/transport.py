"""The I/O edge: run secure channels and sync sessions over asyncio byte streams.

Everything above this module is sans-IO. Here bytes are read from a stream (TCP, a
child process's pipes, our own stdin/stdout), fed to the channel and the session,
and whatever they produce is written back. A :class:`Hub` holds all of one share's
open connections, so what one connection's step produces for another (relayed events,
chunk requests) is written out at once. A protocol or channel error closes the
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
from .replicator import Replicator
from .session import Session
from .share import Share
from .wire import Error, FrameReader, ProtocolError

READ_SIZE = 1 << 20
WRITE_BUFFER = 32 << 20  # bytes queued before a writer waits (asyncio's default: 64 KiB)
HANDSHAKE_TIMEOUT_S = 20.0


class SessionClosed(Exception):
    """The session ended early; the message says why."""


@dataclass
class Streams:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter | asyncio.WriteTransport
    close: Callable[[], None]
    received: int = 0  # bytes on the wire, handshake and framing included
    sent: int = 0


def _write(streams: Streams, data: bytes) -> None:
    if data:
        streams.writer.write(data)
        streams.sent += len(data)


async def _drain(streams: Streams) -> None:
    if isinstance(streams.writer, asyncio.StreamWriter):
        await streams.writer.drain()


async def _read_unless(
    reader: asyncio.StreamReader, stop: asyncio.Event, timeout: float | None
) -> bytes | None:
    """The next bytes from ``reader``, or None as soon as ``stop`` is set."""
    read = asyncio.ensure_future(reader.read(READ_SIZE))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait(
            (read, stopped), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        stopped.cancel()
    if read in done:
        return read.result()
    read.cancel()
    if stop.is_set():
        return None
    raise TimeoutError


class Hub:
    """The open sessions of one share in this process. They share one
    :class:`~backer.replicator.Replicator`, and whatever any step produces for any of
    them (relayed events, chunk requests spread over peers) is flushed after the step."""

    def __init__(self, share: Share, name: str) -> None:
        self.share = share
        self.name = name
        self.replicator = Replicator(share)
        self._flushers: dict[Session, Callable[[], None]] = {}

    def flush(self) -> None:
        for flush in list(self._flushers.values()):
            flush()

    def scan(self) -> None:
        """Scan the share; relay whatever it recorded to every open session."""
        if self.share.scan().events:
            self.replicator.journal_grew()
            self.replicator.advance()
        self.flush()

    def accept(self, channel: SecureChannel) -> Session:
        """Responder side once the channel is up: admit a joiner, then sync."""
        assert channel.peer is not None
        joining = channel.header[:1] == MODE_JOIN
        if joining and not self.share.is_member(channel.peer):
            self.share.admit(
                channel.peer, f"joined with invite {channel.header[1:5].hex()}", channel.header[1:]
            )
            self.replicator.journal_grew()
        self.scan()
        return Session(
            self.share, self.name, welcome=joining, peer=channel.peer, replicator=self.replicator
        )

    def connect(self, channel: SecureChannel) -> Session:
        """Initiator side once the channel is up: scan, then sync."""
        self.scan()
        return Session(self.share, self.name, peer=channel.peer, replicator=self.replicator)

    async def run(
        self,
        streams: Streams,
        channel: SecureChannel,
        open_session: Callable[[SecureChannel], Session],
        one_shot: bool,
        progress: Callable[[Session], None] | None = None,
    ) -> Session:
        """Drive one connection to its end; return its session (raise SessionClosed).

        ``open_session`` is :meth:`accept` or :meth:`connect`. One-shot sessions end when
        both sides are caught up and applied; others run until the peer hangs up. While
        a one-shot peer has not caught us up, no new plan starts: the plan then sees what
        every dialled peer brings, and its chunk requests spread over all of them."""
        frames = FrameReader()
        session: Session | None = None
        if isinstance(streams.writer, asyncio.StreamWriter):  # keep reading while a large
            streams.writer.transport.set_write_buffer_limits(high=WRITE_BUFFER)  # reply drains
        awaited = one_shot
        self.replicator.awaited += awaited

        def stop_awaiting() -> None:
            nonlocal awaited
            if awaited:
                awaited = False
                self.replicator.awaited -= 1
                self.replicator.advance()

        finished = asyncio.Event()  # set when another connection's step completed ours

        def flush() -> None:
            if session is not None and session.outbox:
                channel.send(b"".join(m.encode() for m in session.take_outbox()))
            _write(streams, channel.data_to_send())
            if one_shot and session is not None and session.complete:
                finished.set()

        _write(streams, channel.data_to_send())
        try:
            while not (one_shot and session is not None and session.complete):
                timeout = None if channel.established else HANDSHAKE_TIMEOUT_S
                data = await _read_unless(streams.reader, finished, timeout)
                if data is None:
                    continue
                streams.received += len(data)
                if not data:
                    if session is not None and not one_shot:
                        return session
                    raise SessionClosed("the peer closed the connection")
                plaintext = channel.receive_data(data)
                if channel.established and session is None:
                    session = open_session(channel)
                    session.outbox[:0] = session.start()
                    self._flushers[session] = flush
                if session is not None:
                    for message in frames.feed(plaintext):
                        replies = session.receive(message)  # drains the outbox: then append
                        session.outbox += replies
                    if session.peer_caught_up:
                        stop_awaiting()
                    if progress is not None:
                        progress(session)
                flush()
                self.flush()
                await _drain(streams)
        except (ChannelError, ProtocolError, BackerError) as exc:
            with contextlib.suppress(Exception):
                if channel.established:
                    channel.send(Error(str(exc).encode()).encode())
                    _write(streams, channel.data_to_send())
                    await _drain(streams)
            raise SessionClosed(str(exc)) from exc
        except TimeoutError as exc:
            raise SessionClosed("the handshake timed out") from exc
        except (ConnectionError, OSError) as exc:
            raise SessionClosed(f"connection lost: {exc}") from exc
        except Exception as exc:  # a bug of ours: close this session with a reason, not others
            with contextlib.suppress(Exception):
                if channel.established:
                    channel.send(Error(b"internal error").encode())
                    _write(streams, channel.data_to_send())
            raise SessionClosed(f"internal error: {type(exc).__name__}: {exc}") from exc
        finally:
            streams.close()
            stop_awaiting()
            if session is not None:
                self._flushers.pop(session, None)
                session.close()
                session.stats.wire_bytes_received = streams.received
                session.stats.wire_bytes_sent = streams.sent
            self.flush()
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
