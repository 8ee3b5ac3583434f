"""A hostile member for end-to-end attacks: a device of the share (valid keys, or the
inviter of a valid invite) that completes the real handshake and then speaks backer's
own protocol — the real channel, framing, session and journal — with crafted content.

What it sends and how it answers pass through a :class:`Tactic`, which may rewrite, drop
or add messages; what it records goes into its own journal, signed with its own key, as
a modified client would (``simulations.hostile.Hostile.craft`` makes the crafted
versions). It runs in a thread with its own event loop, beside the real CLI or
``backer run`` that the test attacks in a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from backer.config.identity import load_or_create_key
from backer.connections import transport
from backer.model.share import Share
from backer.protocol.channel import HEADER_LEN, SecureChannel
from backer.protocol.session import Session
from backer.protocol.wire import Message


class Tactic:
    """How the hostile member departs from the protocol; by default it does not."""

    def outgoing(self, session: Session, messages: list[Message]) -> list[Message]:
        """What it sends instead of ``messages`` (the honest session's output)."""
        return messages

    def incoming(self, session: Session, message: Message) -> list[Message] | None:
        """Its answer to ``message`` instead of the honest one; None: answer honestly."""
        return None


class HostileSession(Session):
    """A session whose traffic goes through a :class:`Tactic`."""

    tactic: Tactic

    def take_outbox(self, budget: int | None = None) -> list[Message]:
        return self.tactic.outgoing(self, super().take_outbox(budget))

    def receive(self, message: Message) -> list[Message]:
        crafted = self.tactic.incoming(self, message)
        return super().receive(message) if crafted is None else crafted


class HostileHub(transport.Hub):
    """A hub whose sessions are hostile ones."""

    def __init__(self, share: Share, tactic: Tactic, limits: transport.Limits) -> None:
        super().__init__(share, "hostile", limits, scan_first=False)
        self.tactic = tactic

    def _hostile(self, session: Session) -> Session:
        session.__class__ = HostileSession
        assert isinstance(session, HostileSession)
        session.tactic = self.tactic
        return session

    def accept(self, channel: SecureChannel) -> Session:
        return self._hostile(super().accept(channel))

    def connect(self, channel: SecureChannel) -> Session:
        return self._hostile(super().connect(channel))


class HostileMember:
    """The hostile device's share, opened in a thread of its own while the block runs:
    it serves on ``port`` (as an inviter or member) and can dial others."""

    def __init__(
        self, root: Path, home: Path, tactic: Tactic, limits: transport.Limits | None = None
    ) -> None:
        self.root, self.home, self.tactic = root, home, tactic
        self.limits = limits or transport.Limits(keepalive_s=0.5)
        self.closed: list[str] = []  # why each of its sessions ended
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.share: Share | None = None
        self.hub: HostileHub | None = None
        self.server: asyncio.Server | None = None

    def call(self, work: Callable[[], object], timeout: float = 60) -> object:
        """Run ``work`` in the member's loop (the share is used from that thread alone)."""

        async def run() -> object:
            return work()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    @contextlib.contextmanager
    def running(self, port: int | None = None) -> Iterator[HostileMember]:
        self.thread.start()
        try:
            self.call(self._open)
            if port is not None:
                asyncio.run_coroutine_threadsafe(self._listen(port), self.loop).result(30)
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(30)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
            self.loop.close()

    def _open(self) -> None:
        self.share = Share.open(self.root, load_or_create_key(self.home), home=self.home)
        self.hub = HostileHub(self.share, self.tactic, self.limits)

    async def _close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in asyncio.all_tasks(self.loop) - {asyncio.current_task()}:
            task.cancel()
        if self.share is not None:
            self.share.close()

    async def _listen(self, port: int) -> None:
        self.server = await transport.tcp_server(self._accepted, "127.0.0.1", port)

    def _accepted(self, reader: transport.Received, writer: asyncio.StreamWriter) -> None:
        self.loop.create_task(self._serve(reader, writer))

    async def _serve(self, reader: transport.Received, writer: asyncio.StreamWriter) -> None:
        assert self.share is not None and self.hub is not None
        channel = transport.responder(self.share, self.share.key)
        try:
            channel.receive_data(await reader.readexactly(HEADER_LEN))
            streams = transport.Streams(reader, writer, writer.close)
            await self.hub.run(streams, channel, self.hub.accept, False)
            self.closed.append("the peer closed the session")
        except transport.SessionClosed as exc:
            self.closed.append(str(exc))
        except (asyncio.IncompleteReadError, OSError) as exc:
            self.closed.append(f"{type(exc).__name__}: {exc}")

    def dial(self, address: str, timeout: float = 120) -> str:
        """A member's session with the node at ``address``, until either side ends it;
        why it ended."""
        host, port = address.rsplit(":", 1)

        async def session() -> str:
            assert self.hub is not None
            opening = lambda: transport.tcp_streams(host, int(port))  # noqa: E731
            try:
                await asyncio.wait_for(transport.dial(self.hub, opening, False), timeout)
            except transport.SessionClosed as exc:
                return str(exc)
            except TimeoutError:
                return "still open"
            return "the peer closed the session"

        return str(asyncio.run_coroutine_threadsafe(session(), self.loop).result(timeout + 30))
