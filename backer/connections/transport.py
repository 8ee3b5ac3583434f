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
import functools
import math
import os
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import nacl.signing

from backer.connections.addresses import AddressBook
from backer.errors import BackerError
from backer.model.materializer import Report
from backer.model.replicator import Replicator
from backer.model.share import Share
from backer.protocol.channel import (
    HEADER_LEN,
    MODE_JOIN,
    MODE_SYNC,
    TOO_SLOW,
    ChannelError,
    SecureChannel,
    refusal,
)
from backer.protocol.session import Session
from backer.protocol.wire import Encoder, Error, FrameReader, ProtocolError

READ_SIZE = 4 << 20
FIRST_READ = 16 << 10


def time_scale() -> float:
    """``BACKER_TIME_SCALE`` multiplies every deadline and delay (tests make them short)."""
    try:
        return max(float(os.environ.get("BACKER_TIME_SCALE", "1")), 0.001)
    except ValueError:
        return 1.0


@dataclass(frozen=True)
class Limits:
    """What one connection may cost and how long it may stay silent (docs/security.md)."""

    handshake_s: float = 20.0  # from connect to an established channel, whatever trickles in
    keepalive_s: float = 15.0  # a Ping (Session.keepalive) when nothing was sent for this long
    idle_s: float = 60.0  # nothing received for this long: the peer is gone (or suspended)
    request_s: float = 120.0  # requests outstanding with no answer for this long: same
    acknowledge_s: float = 240.0  # events sent, and nothing but Pings from the peer for
    # this long without its acknowledgement: the session closes (the events stay). Twice
    # request_s: a peer waiting on a silent third device drops it and asks us first
    run_s: float = 120.0  # events of the peer awaiting their run's end for this long (as
    # silence is counted): the session closes. An honest run ends within its message (R70)
    reply_bytes: int = 4 << 20  # replies are built once nothing is unsent, this much at a time
    unsent_bytes: int = 1 << 30  # more than this unsent, or output that has not moved for
    # idle_s: the peer does not read; closed

    @classmethod
    def from_env(cls) -> Limits:
        scale = time_scale()
        return cls(**{f.name: f.default * scale for f in fields(cls) if f.name.endswith("_s")})


GOODBYE_S = 1.0  # after our reason for closing is sent: how long the peer has to read it
LOOP_HELD_S = 1.0  # a wait that overran its timeout by more: the loop was busy elsewhere


class SessionClosed(Exception):
    """The session ended early; the message says why. ``failed``: it ended on an error
    of either side once open (events rejected, a malformed message, a bug), which
    redialling at once would only repeat: the dialler backs off."""

    def __init__(self, reason: str, failed: bool = False) -> None:
        super().__init__(reason)
        self.failed = failed


class RateLimitedLog:
    """One line per reason per ``interval`` seconds; the lines held back are counted and
    the count goes with the next line of that reason (a flood of failing strangers must
    not fill a disk with log lines)."""

    MAX_REASONS = 1000

    def __init__(
        self,
        emit: Callable[[str], None],
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.emit = emit
        self.interval = interval
        self.clock = clock
        self.reasons: dict[str, tuple[float, int]] = {}  # reason -> (last shown, held back)

    def __call__(self, reason: str, detail: str = "") -> None:
        """Log ``detail + reason``; ``reason`` alone decides what counts as the same line."""
        now = self.clock()
        shown, held = self.reasons.get(reason, (-math.inf, 0))
        if now - shown < self.interval:
            self.reasons[reason] = (shown, held + 1)
            return
        if len(self.reasons) >= self.MAX_REASONS:
            self.reasons = {r: v for r, v in self.reasons.items() if now - v[0] < self.interval}
        more = f" ({held} more like this in the last {now - shown:.0f} s)" if held else ""
        self.reasons[reason] = (now, 0)
        self.emit(f"{detail}{reason}{more}")


class Incoming(Protocol):
    """Where a connection's bytes are read from (``asyncio.StreamReader`` or
    :class:`Received`)."""

    async def read(self, n: int) -> bytes | memoryview: ...


@dataclass
class Streams:
    reader: Incoming  # (what a read returns is valid until the next read)
    writer: asyncio.StreamWriter
    close: Callable[[], None]
    received: int = 0  # bytes on the wire, handshake and framing included
    sent: int = 0
    spoke: float = field(default_factory=time.monotonic)  # when we last wrote
    exit_status: Callable[[], Awaitable[int | None]] | None = None  # of a child at the other end
    address: tuple[str, int] | None = None  # what was dialled, for a TCP connection we opened

    def abort(self) -> None:
        """Close at once, dropping unsent data (``close`` would still send it)."""
        self.writer.transport.abort()


class Hangup:
    """Ask a running connection to close with a reason (sent to the peer as an
    ``Error`` when the channel is up): a duplicate session, a shutdown."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._asked = asyncio.Event()

    def __call__(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self._asked.set()

    async def wait(self) -> None:
        await self._asked.wait()


def _silence(waited: float, took: float, timeout: float, heard: bool) -> float:
    """Seconds the peer has been silent, after a wait of ``took`` seconds for it: only
    time spent waiting counts, never our own work (a new device busy for minutes with
    the events of 1,000,000 files took that for the peer's silence and closed the
    session). A wait that overran what it asked for by over ``LOOP_HELD_S`` was held
    by other work on the loop, and the peer's bytes may be in the socket unread: it
    does not count."""
    if heard:
        return 0.0
    return waited if took > timeout + LOOP_HELD_S else waited + took


async def _say_goodbye(streams: Streams, reading: asyncio.Future[bytes] | None) -> None:
    """After our reason for closing is written: half-close, then read and drop what the
    peer still sends until it closes (at most GOODBYE_S). Closed with the peer's data
    unread, the socket would reset the connection, and the peer — busy sending, say
    chunks — would lose our reason with the bytes it had not read yet."""
    if streams.writer.can_write_eof():
        streams.writer.write_eof()
    deadline = time.monotonic() + GOODBYE_S
    try:
        while (left := deadline - time.monotonic()) > 0:
            reading = reading or asyncio.ensure_future(streams.reader.read(READ_SIZE))
            done, _ = await asyncio.wait({reading}, timeout=left)
            if not done or not reading.result():
                return  # out of time, or the peer closed
            reading = None
    finally:
        if reading is not None:
            reading.cancel()


def _write(streams: Streams, data: bytes | bytearray | memoryview) -> None:
    if data:
        streams.writer.write(data)
        streams.sent += len(data)
        streams.spoke = time.monotonic()


class Hub:
    """The open sessions of one share in this process. They share one
    :class:`~backer.model.replicator.Replicator`, and whatever any step produces for any of
    them (relayed events, chunk requests spread over peers) is flushed after the step."""

    def __init__(
        self, share: Share, name: str, limits: Limits | None = None, scan_first: bool = True
    ) -> None:
        """``scan_first``: scan as each session opens (``stdio``, which cannot scan
        before its peer connects); one-shot commands scan once before dialing, and a
        node's watcher keeps the journal current."""
        self.share = share
        self.name = name
        self.limits = limits or Limits.from_env()
        self.scan_first = scan_first
        self.replicator = Replicator(share)
        self.addresses = AddressBook(share.catalog, share.share_id, share.key)
        self._flushers: dict[Session, Callable[[], None]] = {}
        self._closers: dict[Session, Callable[[], None]] = {}
        self.applied: Callable[[Report], None] | None = None  # takes each applied window
        self._wake_loop: asyncio.AbstractEventLoop | None = None

    def flush(self) -> None:
        removed = self.share.members.removed
        for session, close in list(self._closers.items()):
            if session.peer in removed:  # its removal just arrived: it learns nothing more
                close()
        for flush in list(self._flushers.values()):
            flush()
        if self.replicator.reports:  # taken even with no one to hand them to: a join of
            reports, self.replicator.reports = self.replicator.reports, []  # 100,000 files
            for report in reports:  # held every path it wrote until it exited (~7 MB)
                if self.applied is not None:
                    self.applied(report)

    def disconnect(self, device: bytes) -> None:
        """Drop every open session with ``device`` at once, unsent data included (it
        was just removed from the share)."""
        for session, close in list(self._closers.items()):
            if session.peer == device:
                close()

    def scan(self) -> None:
        """Scan the share; relay whatever it recorded to every open session."""
        if self.share.scan().events:
            self.journal_grew()
        self.flush()

    def journal_grew(self) -> None:
        """Events were recorded outside any session (a scan, an invite, a removal):
        push them to every open session at once, and plan for them."""
        self.replicator.journal_grew()
        self.replicator.advance()
        self.flush()

    def _waker(self, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        """What a worker thread of the replicator calls when a local copy ends: the
        replicator moves on in the event loop (not at all once the loop has closed)."""

        def woken() -> None:
            if self.replicator.wake is not None:  # (None: abandoned, the process stops)
                self.replicator.advance()
                self.flush()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(woken)

        return wake

    def _opening(self) -> None:
        if self.scan_first:
            self.scan()

    def accept(self, channel: SecureChannel) -> Session:
        """Responder side once the channel is up: admit a joiner, then sync."""
        assert channel.peer is not None
        joining = channel.header[:1] == MODE_JOIN
        if joining:
            self.share.admit_joiner(channel.peer, channel.header[1:])
            self.replicator.journal_grew()
        self._opening()
        return Session(
            self.share,
            self.name,
            welcome=joining,
            peer=channel.peer,
            replicator=self.replicator,
            addresses=self.addresses,
        )

    def connect(self, channel: SecureChannel) -> Session:
        """Initiator side once the channel is up: scan (unless a watcher does), then sync."""
        self._opening()
        return Session(
            self.share,
            self.name,
            peer=channel.peer,
            replicator=self.replicator,
            addresses=self.addresses,
        )

    def _note_address(self, session: Session, streams: Streams, dialled: bool) -> None:
        """The address that reached the peer is its best one; a peer that reached us is
        at its IP (with the ports it announces, see ``Session._on_addresses``)."""
        if session.peer is None:
            return
        if dialled and streams.address is not None:
            self.addresses.connected(session.peer, *streams.address)
        peer = streams.writer.get_extra_info("peername")
        if not dialled and isinstance(peer, tuple):
            session.remote_host = str(peer[0])

    async def run(
        self,
        streams: Streams,
        channel: SecureChannel,
        open_session: Callable[[SecureChannel], Session],
        one_shot: bool,
        progress: Callable[[Session], None] | None = None,
        established: Callable[[], None] | None = None,
        hangup: Hangup | None = None,
    ) -> Session:
        """Drive one connection to its end; return its session (raise SessionClosed).

        ``open_session`` is :meth:`accept` or :meth:`connect`; ``established`` is called
        once the peer is authenticated (it may refuse the session by raising
        :class:`BackerError`); ``hangup`` closes the connection with its reason.
        One-shot sessions end when both sides are caught up and applied; others run
        until the peer hangs up. While a one-shot peer has not caught us up, no new plan
        starts: the plan then sees what every dialled peer brings, and its chunk requests
        spread over all of them.

        Reading never waits for writing: replies to the peer's requests are built only
        once nothing is unsent, ``limits.reply_bytes`` at a time, and more as it drains."""
        limits = self.limits
        loop = asyncio.get_running_loop()
        if self._wake_loop is not loop:  # (a Hub outlives one asyncio.run in tests)
            self._wake_loop = loop
            self.replicator.wake = self._waker(loop)
        frames = FrameReader()
        session: Session | None = None
        writer = streams.writer
        writer.transport.set_write_buffer_limits(high=0)  # a drain waits for all of it
        awaited = one_shot
        self.replicator.awaited += awaited

        def stop_awaiting() -> None:
            nonlocal awaited
            if awaited:
                awaited = False
                self.replicator.awaited -= 1
                self.replicator.advance()

        finished = asyncio.Event()  # another connection's step completed this one-shot sync

        def unsent() -> int:
            return writer.transport.get_write_buffer_size()

        encoder = Encoder()

        def flush() -> None:
            """Send what is queued, and build replies only once the transport holds
            nothing: about ``reply_bytes`` of them, which the kernel mostly takes at
            once, so that little is copied into the transport's buffer and both
            buffers (plaintext, records) are reused for the next."""
            drained = not unsent()
            if drained:  # the transport took all it was given since: the records
                channel.reuse()  # buffer is free again (not only when the kernel took
                # a whole flush at once, which it mostly does not: a fresh 4 MiB per flush)
            if session is not None:
                messages = session.take_outbox(limits.reply_bytes if drained else 0)
                if messages:
                    channel.send(*encoder.encode(messages))
            _write(streams, channel.data_to_send())
            if not unsent():
                channel.reuse()
            if one_shot and session is not None and session.complete:
                finished.set()

        start = time.monotonic()
        waited = 0.0  # seconds spent waiting for the peer since it last sent anything
        stalled, moved = 0.0, 0  # the same since its catch-up last moved (one-shot), and
        # how far it had moved then (Session.catching_up)
        courtesy = 0.0  # the same for a Done that would acknowledge nothing (one-shot)
        unacknowledged, heard = 0.0, 0  # the same for a Done of the events we sent, and
        # how many messages (not Pings) the peer had sent then (Session.messages_received)
        unfinished = 0.0  # the same while events of the peer await their run's end
        draining, last_delivered = start, 0  # when our output last moved, and how far
        tasks: dict[str, asyncio.Future[Any]] = {}
        _write(streams, channel.data_to_send())
        try:
            while not (one_shot and session is not None and session.complete):
                now = time.monotonic()
                if session is None:
                    timeout = start + limits.handshake_s - now
                    if timeout <= 0:
                        raise TimeoutError
                else:
                    if waited > limits.idle_s:
                        raise BackerError(
                            f"peer unresponsive: nothing received for {limits.idle_s:.0f} s"
                        )
                    if stalled > limits.idle_s:
                        raise BackerError(
                            f"peer unresponsive: its catch-up did not move for "
                            f"{limits.idle_s:.0f} s"
                        )
                    if unacknowledged > limits.acknowledge_s:
                        raise BackerError(
                            f"peer unresponsive: the events sent to it not acknowledged for "
                            f"{limits.acknowledge_s:.0f} s (a later sync sends what it lacks)"
                        )
                    if unfinished > limits.run_s:
                        raise BackerError(
                            f"peer unresponsive: its events awaited the end of their run for "
                            f"{limits.run_s:.0f} s"
                        )
                    if session.overdue(now, limits.request_s):
                        raise BackerError(
                            f"peer unresponsive: no answer to a request for "
                            f"{limits.request_s:.0f} s"
                        )
                    if now - streams.spoke >= limits.keepalive_s:
                        channel.send(session.keepalive().encode())
                        _write(streams, channel.data_to_send())
                    timeout = (
                        max(
                            min(limits.idle_s - waited, streams.spoke + limits.keepalive_s - now),
                            0,
                        )
                        + 0.01
                    )
                delivered = streams.sent - unsent()  # taken by the kernel: the peer reads
                if delivered > last_delivered or not unsent():
                    last_delivered, draining = delivered, now
                if unsent() > limits.unsent_bytes or now - draining > limits.idle_s:
                    raise BackerError(
                        f"the peer does not read: {unsent() >> 10} KiB unsent, none taken "
                        f"for {now - draining:.0f} s"
                    )
                if "read" not in tasks:
                    tasks["read"] = asyncio.ensure_future(streams.reader.read(READ_SIZE))
                if "finished" not in tasks:
                    tasks["finished"] = asyncio.ensure_future(finished.wait())
                if hangup is not None and "hangup" not in tasks:
                    tasks["hangup"] = asyncio.ensure_future(hangup.wait())
                if session is not None and session.backlog and "drain" not in tasks:
                    tasks["drain"] = asyncio.ensure_future(writer.drain())
                before = time.monotonic()
                await asyncio.wait(
                    tasks.values(), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                done = {name for name, task in tasks.items() if task.done()}
                results = {name: tasks.pop(name).result() for name in done}
                if hangup is not None and hangup.reason is not None:
                    raise BackerError(hangup.reason)
                took = time.monotonic() - before
                waited = _silence(waited, took, timeout, "read" in results)
                if "read" in results:
                    data = results["read"]
                    streams.received += len(data)
                    if not data:
                        if session is not None and not one_shot:
                            return session
                        status = await streams.exit_status() if streams.exit_status else None
                        if status:
                            raise SessionClosed(f"the command exited with status {status}")
                        raise SessionClosed(
                            "the peer closed the connection"
                            + ("" if channel.established else " during the handshake")
                        )
                    plaintext = channel.receive_data(data)
                    if channel.established and session is None:
                        # the handshake's last message goes out before the session does
                        # any work: it waited for the first flush, so a first message
                        # slow to build (8 MiB of them, on a loaded machine) ran the
                        # peer's handshake deadline out
                        _write(streams, channel.data_to_send())
                        if established is not None:
                            established()
                        session = open_session(channel)
                        self._note_address(session, streams, channel.initiator)
                        session.lazy = True
                        session.outbox[:0] = session.start()
                        self._flushers[session] = flush
                        self._closers[session] = streams.abort
                    if session is not None:
                        for message in frames.feed(plaintext):
                            replies = session.receive(message)  # drains the outbox: then
                            session.outbox += replies  # append (not in one statement)
                        if session.peer_caught_up:
                            stop_awaiting()
                        if progress is not None:
                            progress(session)
                if one_shot and session is not None and not session.peer_caught_up:
                    # a peer that pings, or sends the same events again, holds a join or
                    # a sync open for ever: only a catch-up that moves on counts
                    stalled = _silence(stalled, took, timeout, session.catching_up != moved)
                    moved = session.catching_up
                if session is not None and session.awaiting_acknowledgement:
                    # a peer that took our events and then only pinged held a sync open
                    # for ever, and a node's session (a slot) as long as it liked
                    spoke = session.messages_received != heard
                    unacknowledged = _silence(unacknowledged, took, timeout, spoke)
                else:
                    unacknowledged = 0.0
                if session is not None:
                    heard = session.messages_received
                # a member that began a run and never ended it held its events (64 MiB)
                # for as long as the session lasted
                held = session is not None and session.holding_run
                unfinished = _silence(unfinished, took, timeout, not held)
                if one_shot and session is not None and session.awaiting_courtesy:
                    courtesy = _silence(courtesy, took, timeout, False)
                    if courtesy > limits.idle_s:  # a peer that never acknowledges held a
                        break  # join open for ever; it owes us nothing: done
                else:
                    courtesy = 0.0
                flush()
                self.flush()
        except SessionClosed:
            raise
        except (ChannelError, ProtocolError, BackerError) as exc:
            with contextlib.suppress(Exception):
                if channel.established:
                    channel.send(Error(str(exc).encode()).encode())
                    _write(streams, channel.data_to_send())
                elif isinstance(exc, ChannelError) and exc.refusal and not channel.initiator:
                    _write(streams, refusal(exc.refusal))
            ours = hangup is not None and hangup.reason is not None  # (not an error)
            if ours and channel.established:
                if session is not None:  # half-closed: what the share's other sessions
                    self._flushers.pop(session, None)  # flush must not be written to it
                with contextlib.suppress(Exception):
                    await _say_goodbye(streams, tasks.pop("read", None))
            raise SessionClosed(str(exc), channel.established and not ours) from exc
        except TimeoutError as exc:
            if not channel.initiator:
                with contextlib.suppress(Exception):
                    _write(streams, refusal(TOO_SLOW))
            raise SessionClosed(
                f"the handshake did not complete within {limits.handshake_s:.0f} s"
            ) from exc
        except (ConnectionError, OSError) as exc:
            raise SessionClosed(f"connection lost: {exc}") from exc
        except Exception as exc:  # a bug of ours: close this session with a reason, not others
            with contextlib.suppress(Exception):
                if channel.established:
                    channel.send(Error(b"internal error").encode())
                    _write(streams, channel.data_to_send())
            raise SessionClosed(f"internal error: {type(exc).__name__}: {exc}", True) from exc
        finally:
            for task in tasks.values():
                task.cancel()
            streams.close()
            stop_awaiting()
            if session is not None:
                self._flushers.pop(session, None)
                self._closers.pop(session, None)
                session.close()
                session.stats.wire_bytes_received = streams.received
                session.stats.wire_bytes_sent = streams.sent
            self.flush()
        assert session is not None
        return session


async def dial(
    hub: Hub,
    opening: Callable[[], Awaitable[Streams]],
    one_shot: bool,
    *,
    channel: Callable[[], SecureChannel] | None = None,
    progress: Callable[[Session], None] | None = None,
    established: Callable[[SecureChannel], None] | None = None,
    hangup: Hangup | None = None,
) -> Session:
    """A session with the peer at the end of ``opening`` (a fresh stream per attempt),
    over ``channel`` (default: a member's channel to its share).

    A member presents its newest share key; a peer that has not seen that key's rotation
    yet refuses the handshake, so the older keys are tried in turn, each on a new
    connection (see docs/decisions.md)."""
    keys = [b""] if channel else hub.share.share_keys or [b""]
    for index, psk in enumerate(keys, 1):
        secure = channel() if channel else initiator(hub.share, hub.share.key, psk)
        on_established = None if established is None else functools.partial(established, secure)
        try:
            return await hub.run(
                await opening(), secure, hub.connect, one_shot, progress, on_established, hangup
            )
        except SessionClosed:
            if secure.established or index == len(keys):
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")


def known_addresses(share: Share) -> list[str]:
    """The peer addresses this share remembers (from sync, join, repair), newest first."""
    return [a for a in (share.catalog.get_meta("peers") or b"").decode().split("\n") if a]


def remember_address(share: Share, address: str) -> None:
    """Remember a peer address that answered (dialled again by ``sync`` and ``run``)."""
    known = known_addresses(share)
    if address not in known:
        with share.db.conn:
            share.catalog.set_meta("peers", "\n".join([address, *known]).encode())


# -- the two ends -------------------------------------------------------------------------


def initiator(share: Share, key: nacl.signing.SigningKey, psk: bytes = b"") -> SecureChannel:
    """A channel that asks to sync the share with a member, with ``psk`` (one of the
    share keys; default: the current one)."""
    if not share.share_key:
        raise BackerError(
            "this device has not finished joining the share: run 'backer join' again "
            "with the same token"
        )

    def check(peer: bytes, header: bytes, proof: bytes) -> str | None:
        if peer in share.members:
            return None
        if peer in share.members.removed:
            return "the peer was removed from this share"
        return "the peer is not a member of this share"

    return SecureChannel(key, check, header=MODE_SYNC + share.share_id, psk=psk or share.share_key)


def responder(share: Share, key: nacl.signing.SigningKey) -> SecureChannel:
    """A channel that accepts members with any share key we hold (removed devices are
    refused by their device key), or a joiner with an invite (checked by :meth:`Hub.accept`);
    to a joiner it proves the invite with the inviter's signed invite event."""

    def lookup(header: bytes) -> list[bytes]:
        mode, ident = header[:1], header[1:HEADER_LEN]
        if mode == MODE_SYNC and ident == share.share_id:
            return share.share_keys
        psk = share.invite_key(ident) if mode == MODE_JOIN else None
        return [psk] if psk else []

    def check(peer: bytes, header: bytes, proof: bytes) -> str | None:
        return None if header[:1] == MODE_JOIN else share.members.refusal(peer)

    def proof(header: bytes) -> bytes:
        return share.catalog.invite_event(header[1:]) if header[:1] == MODE_JOIN else b""

    return SecureChannel(key, check, lookup_psk=lookup, proof=proof)


# -- streams --------------------------------------------------------------------------------


class Received(asyncio.streams.FlowControlMixin, asyncio.BufferedProtocol):
    """A TCP connection's incoming bytes, received straight into two buffers used in
    turn: no copy into a stream buffer and out again, no new buffer per read (a
    connection may receive a whole transfer: 1 GiB went through ``StreamReader``'s two
    copies). :meth:`read` returns a view that stays valid until the next call — the
    transport hands it to the channel, which keeps no reference. The buffers start at
    ``FIRST_READ`` bytes and double, up to ``READ_SIZE``, each time a read fills one: a
    stranger trickling a handshake costs a few KiB, not two MiB zeroed."""

    def __init__(self) -> None:
        super().__init__()
        self._buffers = [bytearray(FIRST_READ), bytearray(FIRST_READ)]
        self._filled = 0  # bytes received into _buffers[0], not yet read
        self._ended = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._full = False  # reading paused: the buffer is full until the next read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buffers[0])[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        if self._filled == len(self._buffers[0]) and self._transport is not None:
            self._full = True
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        """The peer is done sending; our side stays open for what we still have to say
        (a refusal's reason, as ``StreamReader``'s protocol does): True keeps it."""
        self._ended = True
        self._wake()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._ended = True
        self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def readexactly(self, n: int) -> bytes:
        """The next ``n`` bytes (at most ``FIRST_READ``), copied; what arrived after them
        stays for :meth:`read`. Raises ``asyncio.IncompleteReadError`` at an early end."""
        while self._filled < n and not self._ended:
            await self._arrival()
        buffer = self._buffers[0]
        if self._filled < n:
            if self._error is not None:
                raise self._error
            raise asyncio.IncompleteReadError(bytes(buffer[: self._filled]), n)
        taken = bytes(buffer[:n])
        buffer[: self._filled - n] = buffer[n : self._filled]  # (same length: no resize)
        self._filled -= n
        self._resume()
        return taken

    async def _arrival(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _resume(self) -> None:
        if self._full and self._transport is not None:
            self._full = False
            self._transport.resume_reading()

    async def read(self, n: int = READ_SIZE) -> bytes | memoryview:
        """What arrived since the last call (up to ``READ_SIZE`` bytes; ``n`` is
        ignored); b"" at the end; the connection's error if it failed."""
        while not self._filled and not self._ended:
            await self._arrival()
        if not self._filled:
            if self._error is not None:
                raise self._error
            return b""
        data = memoryview(self._buffers[0])[: self._filled]
        self._buffers.reverse()
        grown = min(2 * self._filled, READ_SIZE)
        if self._filled == len(data.obj) and len(self._buffers[0]) < grown:  # (data.obj:
            self._buffers[0] = bytearray(grown)  # the buffer read; [0]: the next one)
        self._filled = 0
        self._resume()
        return data


Accepted = Callable[[Received, asyncio.StreamWriter], None]
"""Takes a connection a server accepted: its incoming bytes and its writer."""


class _AcceptedReceived(Received):
    """A server's connection: handed to ``accepted`` as soon as it is made."""

    def __init__(self, accepted: Accepted) -> None:
        super().__init__()
        self._accepted = accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert isinstance(transport, asyncio.Transport)
        loop = asyncio.get_running_loop()
        self._accepted(self, asyncio.StreamWriter(transport, self, None, loop))


async def tcp_server(accepted: Accepted, host: str, port: int) -> asyncio.Server:
    """Listen on ``host:port``; each connection's bytes are received as a dialled one's
    (:class:`Received`: into two reused buffers, not through ``StreamReader``'s copies),
    for whichever side of a transfer the connection turns out to be."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _AcceptedReceived(accepted), host, port)


async def tcp_streams(host: str, port: int) -> Streams:
    loop = asyncio.get_running_loop()
    try:
        transport, received = await asyncio.wait_for(
            loop.create_connection(Received, host, port), 10
        )
    except (OSError, TimeoutError) as exc:
        raise BackerError(f"cannot reach {host}:{port}: {exc or 'timed out'}") from exc
    writer = asyncio.StreamWriter(transport, received, None, loop)
    return Streams(received, writer, writer.close, address=(host, port))


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

    async def exit_status() -> int | None:
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(process.wait(), 2)
        return None

    return Streams(process.stdout, process.stdin, close, exit_status=exit_status)


async def stdio_streams() -> Streams:
    """Our own stdin/stdout as a byte stream (for ``backer stdio``)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_SIZE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    transport, protocol = await loop.connect_write_pipe(
        lambda: asyncio.streams.FlowControlMixin(loop), sys.stdout.buffer
    )
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    return Streams(reader, writer, transport.close)
