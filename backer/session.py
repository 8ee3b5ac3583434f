"""The sync logic of one peer connection, as a sans-IO state machine.

It consumes :mod:`backer.wire` messages and returns the messages to send; it never
touches a socket, so transports, tests and simulations drive it the same way. It does
read and write the local share (that is its job), through :class:`Share`.

Both sides run the same machine:

1. send ``Hello`` and ``Summary`` (signed checkpoint per author);
2. on the peer's ``Summary``: send, in this device's arrival order (a causal order),
   every event the peer lacks, then ``CaughtUp``; forks are recorded, never sent;
3. on ``Events``: verify and store each author's run (one signature per run), apply it;
4. once the peer is caught up, the share's :class:`~backer.replicator.Replicator`
   (shared by every open session of the device) materializes: resolve conflicts, plan,
   ask for missing manifests and chunks, apply; then push any event this produced, and
   send ``Done``;
5. answer ``WantManifests`` / ``WantChunks`` from local data at any time.

A one-shot sync is complete when the peer caught us up, our materialization is idle,
and the peer's ``Done`` acknowledges every ``Events`` message we sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from journal import Checkpoint, Event, JournalError, Range

from .replicator import CHUNKS_PER_REQUEST, MANIFESTS_PER_REQUEST, Replicator
from .share import Share
from .wire import (
    PROTOCOL_VERSION,
    CaughtUp,
    Chunk,
    Done,
    Error,
    Events,
    Hello,
    Manifests,
    Message,
    ProtocolError,
    Summary,
    WantChunks,
    WantManifests,
    Welcome,
)

EVENTS_PER_MESSAGE = 2000
EVENT_BYTES_PER_MESSAGE = 4 * 1024 * 1024  # well under the frame limit (a scan event of
# 1,000 files is ~110 KB)


def _split(run: list[Event]) -> list[list[Event]]:
    """Consecutive parts of a run, each within the count and byte limits of a message."""
    parts: list[list[Event]] = [[]]
    size = 0
    for event in run:
        too_many = len(parts[-1]) >= EVENTS_PER_MESSAGE
        if parts[-1] and (too_many or size + len(event.raw) > EVENT_BYTES_PER_MESSAGE):
            parts.append([])
            size = 0
        parts[-1].append(event)
        size += len(event.raw)
    return parts
MAX_PENDING_RUN_BYTES = 256 * 1024 * 1024
_NEVER = 2**63


@dataclass
class WireStats:
    events_received: int = 0
    events_sent: int = 0
    chunk_bytes_received: int = 0
    chunk_bytes_sent: int = 0
    chunks_fetched: int = 0
    wire_bytes_received: int = 0  # set by the transport when the connection ends
    wire_bytes_sent: int = 0


class Session:
    """One side of a sync session with one peer."""

    def __init__(
        self,
        share: Share,
        name: str = "",
        welcome: bool = False,
        peer: bytes | None = None,
        replicator: Replicator | None = None,
    ) -> None:
        """``welcome``: the peer just joined with an invite; start by giving it the key.
        ``peer``: its authenticated device key, when a channel established one.
        ``replicator``: shared with the device's other open sessions (else a private one)."""
        self.share = share
        self.peer = peer
        self.welcome = welcome
        self.replicator = replicator or Replicator(share)
        self.replicator.attach(self)
        self.name = name
        self.stats = WireStats()
        self.outbox: list[Message] = []
        self.forks: list[str] = []
        self.peer_lengths: dict[bytes, int] | None = None
        self.peer_caught_up = False
        self.pending_run: dict[bytes, list[bytes]] = {}
        self.events_messages_sent = 0
        self.events_messages_received = 0
        self.peer_acknowledged = -1
        self.peer_files_written = 0
        self.bytes_in_flight = 0  # chunk bytes asked of this peer (kept by the replicator)

    # -- driving ------------------------------------------------------------------------

    def start(self) -> list[Message]:
        checkpoints = [c.encode() for c in self.share.journal.summary().values()]
        opening: list[Message] = [Welcome(self.share.share_key)] if self.welcome else []
        return [*opening, Hello(PROTOCOL_VERSION, self.name.encode()), Summary(checkpoints)]

    @property
    def complete(self) -> bool:
        """A one-shot sync may end: both sides caught up and applied."""
        return (
            self.peer_caught_up
            and self.replicator.idle
            and self.peer_acknowledged == self.events_messages_sent
        )

    def receive(self, message: Message) -> list[Message]:
        """Handle one message from the peer; return what to send back to it.

        Other sessions sharing the replicator may have messages in their ``outbox``
        afterwards (relayed events, chunk requests): the transport flushes those."""
        handler = getattr(self, f"_on_{type(message).__name__.lower()}", None)
        if handler is None:
            raise ProtocolError(f"unexpected message {type(message).__name__}")
        return handler(message) + self.take_outbox()

    def take_outbox(self) -> list[Message]:
        out, self.outbox = self.outbox, []
        return out

    def close(self) -> None:
        """The connection is gone: hand what was asked of this peer to the others."""
        self.replicator.detach(self)

    # -- journal exchange ---------------------------------------------------------------

    def _on_hello(self, message: Hello) -> list[Message]:
        if message.version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"peer speaks protocol {message.version}, we speak {PROTOCOL_VERSION}"
            )
        return []

    def _on_welcome(self, message: Welcome) -> list[Message]:
        if self.share.share_key or len(message.share_key) != 32:
            raise ProtocolError("unexpected Welcome")
        self.share.set_share_key(message.share_key)
        return []

    def _on_summary(self, message: Summary) -> list[Message]:
        if self.peer_lengths is not None:
            raise ProtocolError("a second summary")
        try:
            peer = self.share.journal.check_summary(
                Checkpoint.decode(raw) for raw in message.checkpoints
            )
        except (JournalError, ValueError) as exc:
            raise ProtocolError(f"bad summary: {exc}") from exc
        ranges, forks = self.share.journal.missing_for(peer)
        self.peer_lengths = {author: c.length for author, c in peer.items()}
        for fork in forks:
            self.peer_lengths[fork.author] = _NEVER
            self.forks.append(fork.author.hex())
        return [*self._events_for(ranges), CaughtUp()]

    def _events_for(self, ranges: list[Range]) -> list[Message]:
        """Events messages for ``ranges``: runs of one author, in our arrival order."""
        assert self.peer_lengths is not None
        runs: list[list[Event]] = []
        for event in self.share.journal.in_ranges(ranges):
            if runs and runs[-1][0].author == event.author:
                runs[-1].append(event)
            else:
                runs.append([event])
        messages: list[Message] = []
        for run in runs:
            author, end = run[0].author, run[-1].seq + 1
            checkpoint = self.share.journal.checkpoint_at(author, end)
            parts = _split(run)
            for index, part in enumerate(parts):
                last = index == len(parts) - 1
                raw_checkpoint = checkpoint.encode() if last and checkpoint else b""
                messages.append(Events(raw_checkpoint, [e.raw for e in part], int(not last)))
            self.peer_lengths[author] = max(self.peer_lengths.get(author, 0), end)
            self.stats.events_sent += len(run)
        self.events_messages_sent += len(messages)
        return messages

    def _on_events(self, message: Events) -> list[Message]:
        self.events_messages_received += 1
        if not message.events:
            raise ProtocolError("empty Events message")
        author = Event.decode(message.events[0]).author
        run = self.pending_run.setdefault(author, [])
        run.extend(message.events)
        if sum(map(len, run)) > MAX_PENDING_RUN_BYTES:
            raise ProtocolError("a run of events without a checkpoint is too long")
        if message.more:
            return []
        del self.pending_run[author]
        checkpoint = Checkpoint.decode(message.checkpoint) if message.checkpoint else None
        try:
            result = self.share.ingest(run, checkpoint)
        except (JournalError, ValueError) as exc:
            raise ProtocolError(f"rejected events: {exc}") from exc
        if result.forks:
            self.forks.append(author.hex())
        if self.peer_lengths is not None:
            last = Event.decode(run[-1]).seq + 1
            self.peer_lengths[author] = max(self.peer_lengths.get(author, 0), last)
        self.stats.events_received += len(result.added)
        if result.added:
            self.replicator.journal_grew()
        self.replicator.advance()
        return []

    def _on_caughtup(self, message: CaughtUp) -> list[Message]:
        self.peer_caught_up = True
        self.replicator.dirty = True
        self.replicator.advance()
        return []

    def _on_done(self, message: Done) -> list[Message]:
        self.peer_acknowledged = message.events_received
        if message.files_written > self.peer_files_written:
            self.peer_files_written = message.files_written
            self.replicator.peer_wrote_files()
        return []

    def _on_error(self, message: Error) -> list[Message]:
        raise ProtocolError(f"peer closed the session: {message.reason.decode(errors='replace')}")

    # -- serving content ----------------------------------------------------------------

    def _on_wantmanifests(self, message: WantManifests) -> list[Message]:
        if len(message.ids) > MANIFESTS_PER_REQUEST:
            raise ProtocolError("too many manifests asked at once")
        bodies = []
        for manifest_id in message.ids:
            manifest = self.share.catalog.manifest(manifest_id)
            bodies.append(manifest.encoded if manifest else b"")
        return [Manifests(message.ids, bodies)]

    def _on_wantchunks(self, message: WantChunks) -> list[Message]:
        if len(message.hashes) > CHUNKS_PER_REQUEST:
            raise ProtocolError("too many chunks asked at once")
        replies: list[Message] = []
        for chunk_hash in message.hashes:
            data = self.replicator.store.read(chunk_hash) or b""
            self.stats.chunk_bytes_sent += len(data)
            replies.append(Chunk(chunk_hash, data))
        return replies

    # -- fetching -------------------------------------------------------------------------

    def _on_manifests(self, message: Manifests) -> list[Message]:
        if len(message.ids) != len(message.bodies):
            raise ProtocolError("manifest ids and bodies differ in number")
        for manifest_id, body in zip(message.ids, message.bodies, strict=True):
            self.replicator.manifest_arrived(self, manifest_id, body)
        self.share.db.conn.commit()
        self.replicator.advance()
        return []

    def _on_chunk(self, message: Chunk) -> list[Message]:
        self.replicator.chunk_arrived(self, message.hash, message.data)
        self.replicator.advance()
        return []

    def push(self) -> list[Message]:
        """Events this device holds that the peer has not been sent: its own new local
        changes, resolutions, or events another session brought in. Sessions are
        long-lived: call this whenever the journal grows."""
        if self.peer_lengths is None:
            return []
        ranges = []
        for author, checkpoint in self.share.journal.summary().items():
            have = self.peer_lengths.get(author, 0)
            if have < checkpoint.length:
                ranges.append(Range(author, have, checkpoint.length))
        return self._events_for(ranges)
