"""The sync logic of one peer connection, as a sans-IO state machine.

It consumes :mod:`backer.wire` messages and returns the messages to send; it never
touches a socket, so transports, tests and simulations drive it the same way. It does
read and write the local share (that is its job), through :class:`Share`.

Both sides run the same machine:

1. send ``Hello`` and ``Summary`` (signed checkpoint per author);
2. on the peer's ``Summary``: send, in this device's arrival order (a causal order),
   every event the peer lacks, then ``CaughtUp``; forks are recorded, never sent;
3. on ``Events``: verify and store each author's run (one signature per run), apply it;
4. once the peer is caught up, *materialize*: resolve conflicts, plan, ask for missing
   manifests, then for chunks that no local file holds (bounded bytes in flight), then
   apply the plan; push any event this produced, and send ``Done``;
5. answer ``WantManifests`` / ``WantChunks`` from local data at any time.

A one-shot sync is complete when the peer caught us up, our materialization is idle,
and the peer's ``Done`` acknowledges every ``Events`` message we sent.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from journal import Checkpoint, Event, JournalError, Range

from .chunks import ChunkStore
from .content import Manifest
from .materializer import (
    Materializer,
    Operation,
    Report,
    chunks_needed,
    manifests_needed,
    plan,
)
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
MANIFESTS_PER_REQUEST = 500
CHUNKS_PER_REQUEST = 64
MAX_BYTES_IN_FLIGHT = 16 * 1024 * 1024
MAX_PENDING_RUN_BYTES = 256 * 1024 * 1024
_NEVER = 2**63


@dataclass
class SyncStats:
    events_received: int = 0
    events_sent: int = 0
    files_written: int = 0
    files_deleted: int = 0
    chunk_bytes_received: int = 0
    chunk_bytes_sent: int = 0
    chunks_reused: int = 0
    chunks_fetched: int = 0
    conflicts_resolved: int = 0


class Session:
    """One side of a sync session with one peer."""

    def __init__(
        self, share: Share, name: str = "", welcome: bool = False, peer: bytes | None = None
    ) -> None:
        """``welcome``: the peer just joined with an invite; start by giving it the key.
        ``peer``: its authenticated device key, when a channel established one."""
        self.share = share
        self.peer = peer
        self.welcome = welcome
        self.store = ChunkStore(share.root, share.catalog)
        self.name = name
        self.stats = SyncStats()
        self.reports: list[Report] = []
        self.forks: list[str] = []
        self.peer_lengths: dict[bytes, int] | None = None
        self.peer_caught_up = False
        self.pending_run: dict[bytes, list[bytes]] = {}
        self.events_messages_sent = 0
        self.events_messages_received = 0
        self.peer_acknowledged = -1
        self.dirty = False
        self.operations: list[Operation] | None = None
        self.manifests_outstanding: set[bytes] = set()
        self.chunk_queue: deque[bytes] = deque()
        self.chunks_in_flight: dict[bytes, int] = {}
        self.chunks_planned = False
        self.bytes_to_fetch = 0  # chunk bytes this session expects to receive (for progress)

    # -- driving ------------------------------------------------------------------------

    def start(self) -> list[Message]:
        checkpoints = [c.encode() for c in self.share.journal.summary().values()]
        opening: list[Message] = [Welcome(self.share.share_key)] if self.welcome else []
        return [*opening, Hello(PROTOCOL_VERSION, self.name.encode()), Summary(checkpoints)]

    @property
    def idle(self) -> bool:
        return self.operations is None and not self.dirty

    @property
    def complete(self) -> bool:
        """A one-shot sync may end: both sides caught up and applied."""
        return (
            self.peer_caught_up
            and self.idle
            and self.peer_acknowledged == self.events_messages_sent
        )

    def receive(self, message: Message) -> list[Message]:
        """Handle one message from the peer; return what to send back."""
        handler = getattr(self, f"_on_{type(message).__name__.lower()}", None)
        if handler is None:
            raise ProtocolError(f"unexpected message {type(message).__name__}")
        return handler(message)

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
            parts = [
                run[i : i + EVENTS_PER_MESSAGE] for i in range(0, len(run), EVENTS_PER_MESSAGE)
            ]
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
            self.dirty = True
        return self._advance()

    def _on_caughtup(self, message: CaughtUp) -> list[Message]:
        self.peer_caught_up = True
        self.dirty = True
        return self._advance()

    def _on_done(self, message: Done) -> list[Message]:
        self.peer_acknowledged = message.events_received
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
            data = self.store.read(chunk_hash) or b""
            self.stats.chunk_bytes_sent += len(data)
            replies.append(Chunk(chunk_hash, data))
        return replies

    # -- fetching and applying ------------------------------------------------------------

    def _on_manifests(self, message: Manifests) -> list[Message]:
        if len(message.ids) != len(message.bodies):
            raise ProtocolError("manifest ids and bodies differ in number")
        for manifest_id, body in zip(message.ids, message.bodies, strict=True):
            if manifest_id not in self.manifests_outstanding:
                raise ProtocolError("a manifest we did not ask for")
            self.manifests_outstanding.discard(manifest_id)
            if not body:
                continue
            try:
                manifest = Manifest.decode(body)
            except ValueError as exc:
                raise ProtocolError(f"malformed manifest: {exc}") from exc
            if manifest.id != manifest_id:
                raise ProtocolError("a manifest does not match its id")
            self.share.catalog.put_received_manifest(manifest)
        self.share.db.conn.commit()
        return self._advance()

    def _on_chunk(self, message: Chunk) -> list[Message]:
        if self.chunks_in_flight.pop(message.hash, None) is None:
            raise ProtocolError("a chunk we did not ask for")
        if message.data:
            if not self.store.put(message.hash, message.data):
                raise ProtocolError("a chunk does not match its hash")
            self.stats.chunk_bytes_received += len(message.data)
            self.stats.chunks_fetched += 1
        return self._advance()

    def _advance(self) -> list[Message]:
        """Move the materialization forward as far as it can go without waiting."""
        out: list[Message] = []
        if not self.peer_caught_up:
            return out
        if self.operations is None:
            if not self.dirty:
                return out
            out += self._plan()
        if self.manifests_outstanding:
            return out
        if not self.chunks_planned:
            self._plan_chunks()
        out += self._request_chunks()
        if self.chunk_queue or self.chunks_in_flight:
            return out
        self._apply()
        out += self.push()
        if self.dirty:
            return out + self._advance()
        return [*out, Done(self.events_messages_received)]

    def _plan(self) -> list[Message]:
        self.dirty = False
        self.stats.conflicts_resolved += self.share.resolve_conflicts()
        self.operations = plan(self.share.catalog)
        self.chunks_planned = False
        wanted = manifests_needed(self.operations, self.share.catalog)
        self.manifests_outstanding = set(wanted)
        step = MANIFESTS_PER_REQUEST
        return [WantManifests(wanted[i : i + step]) for i in range(0, len(wanted), step)]

    def _plan_chunks(self) -> None:
        assert self.operations is not None
        needed = chunks_needed(self.operations, self.share.catalog, self.store)
        wanted, total = set(needed), 0
        for op in self.operations:
            manifest = self.share.catalog.manifest(op.version.content)
            for ref in manifest.chunks if manifest is not None else ():
                total += 1
                if ref.hash in wanted:
                    self.bytes_to_fetch += ref.length
                    wanted.discard(ref.hash)
        self.stats.chunks_reused += max(0, total - len(needed))
        self.chunk_queue.extend(needed)
        self.chunks_planned = True

    def _apply(self) -> None:
        assert self.operations is not None
        report = Materializer(self.share.root, self.share.catalog, self.store).apply(
            self.operations
        )
        self.share.db.conn.commit()
        self.store.clear_incoming()
        self.reports.append(report)
        self.stats.files_written += len(report.written)
        self.stats.files_deleted += len(report.deleted)
        self.operations = None

    def _request_chunks(self) -> list[Message]:
        requests: list[Message] = []
        batch: list[bytes] = []
        in_flight = sum(self.chunks_in_flight.values())
        while self.chunk_queue and in_flight < MAX_BYTES_IN_FLIGHT:
            chunk_hash = self.chunk_queue.popleft()
            self.chunks_in_flight[chunk_hash] = 256 * 1024  # the most a chunk can be
            in_flight += 256 * 1024
            batch.append(chunk_hash)
            if len(batch) == CHUNKS_PER_REQUEST:
                requests.append(WantChunks(batch))
                batch = []
        if batch:
            requests.append(WantChunks(batch))
        return requests

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
