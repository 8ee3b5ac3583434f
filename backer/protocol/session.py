"""The sync logic of one peer connection, as a sans-IO state machine.

It consumes :mod:`backer.protocol.wire` messages and returns the messages to send; it never
touches a socket, so transports, tests and simulations drive it the same way. It does
read and write the local share (that is its job), through :class:`Share`.

Both sides run the same machine:

1. send ``Hello`` and ``Summary`` (signed checkpoint per author);
2. on the peer's ``Summary``: send, in this device's arrival order (a causal order),
   every event the peer lacks, then ``CaughtUp``; forks are recorded, never sent.
   Those messages, like every relayed event after them, are built lazily as the peer
   takes them (below), so a catch-up of the whole journal holds a page of it;
3. on ``Events``: verify and store each author's run (one signature per run), apply it;
4. once the peer is caught up, the share's :class:`~backer.model.replicator.Replicator`
   (shared by every open session of the device) materializes: resolve conflicts, plan,
   ask for missing manifests and chunks, apply; then push any event this produced, and
   send ``Done``;
5. answer ``WantManifests`` / ``WantChunks`` from local data at any time, lazily:
   requests are queued (at most ``MAX_OWED``) and replies are built only as the
   transport asks for them (:meth:`Session.take_outbox` with a byte budget), so a peer
   that asks without reading, or that claims to hold nothing, costs a bounded amount
   of memory.

A one-shot sync is complete when the peer caught us up, our materialization is idle,
and the peer's ``Done`` acknowledges every ``Events`` message we sent.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

from backer.model.membership import MAX_MEMBERS
from backer.model.replicator import MANIFESTS_PER_REQUEST, Replicator
from backer.model.share import Share
from backer.protocol.announce import Announcement
from backer.protocol.wire import (
    CHUNKS_BYTES,
    CHUNKS_PER_REQUEST,
    PROTOCOL_VERSION,
    Addresses,
    CaughtUp,
    Chunks,
    Done,
    Error,
    Events,
    Hello,
    ManifestPart,
    Manifests,
    Message,
    Need,
    Ping,
    ProtocolError,
    Summary,
    WantChunks,
    WantManifests,
    Welcome,
)
from journal import Checkpoint, Event, JournalError, Range

EVENTS_PER_MESSAGE = 2000
EVENT_BYTES_PER_MESSAGE = 4 * 1024 * 1024  # well under the frame limit (a scan event of
# 1,000 files is ~110 KB)
MAX_PENDING_BYTES = 64 * 1024 * 1024  # per session, over every author: the author is
# read from bytes not verified yet, so a per-author cap would be no cap. Counted as held
# (each event a bytes object and a list slot), not as the events' own length. No run of
# an honest sender spans messages (_events_for); an older one's spans them only for an
# append larger than a message (a prune's UNHELD events: 64 MiB is 2,000,000 contents)
MAX_PENDING_EVENTS = 4 * EVENTS_PER_MESSAGE  # per session, over every author: four messages' worth
MAX_OWED = 16_384  # requests queued from one peer (an honest one has at most
# MAX_CHUNKS_IN_FLIGHT + MANIFESTS_IN_FLIGHT outstanding)
BATCHED_MANIFEST_BYTES = 4096  # manifests read 500 at a time: a small file's (~1 chunk)
REPLY_BYTES = 4 * 1024 * 1024  # Manifests, Summary parts and ManifestPart slices stay below
MAX_MANIFEST_BYTES = 128 * 1024 * 1024  # 3.7M chunks: a 57 GB file even at the minimum
# chunk size
MAX_ANNOUNCEMENTS = 1024  # per Addresses message: one per member (at most 1,000)
_NEVER = 2**63
_CHUNK, _MANIFEST = 0, 1
T = TypeVar("T")


def _event_size(event: Event) -> int:
    return len(event.raw) + 4


def _blob_size(blob: bytes) -> int:
    return len(blob) + 4


def _held(events: list[bytes]) -> int:
    """The memory a run's events hold while they wait for its end: each a bytes object
    (a 33-byte header, its allocation rounded to 16 bytes) and its slot in the run's
    list. Tiny events cost far more than their length: counted by length, 2-byte ones
    (56 bytes each) let 24 MiB of frames hold 250 MiB against 8 MiB counted."""
    return sum((len(event) + 48) & ~15 for event in events) + 8 * len(events)


def _parts(items: list[T], size: Callable[[T], int], limit: int) -> list[list[T]]:
    """Consecutive slices of ``items``, each within ``limit`` bytes (one item at least),
    so that no message approaches the frame limit."""
    parts: list[list[T]] = [[]]
    total = 0
    for item in items:
        if parts[-1] and total + size(item) > limit:
            parts.append([])
            total = 0
        parts[-1].append(item)
        total += size(item)
    return parts


OPENING, SUMMARY, SYNCING = 0, 1, 2
PHASE_NAMES = {OPENING: "before Hello", SUMMARY: "before the Summary", SYNCING: "after Summary"}
LEGAL: dict[int, frozenset[type[Message]]] = {  # which message the peer may send when
    OPENING: frozenset({Welcome, Hello}),  # Welcome: to a joiner, first
    SUMMARY: frozenset({Summary}),  # in parts until ``more`` is 0
    SYNCING: frozenset(
        {
            Events,
            CaughtUp,
            WantManifests,
            Manifests,
            ManifestPart,
            WantChunks,
            Chunks,
            Done,
            Addresses,
            Need,
        }
    ),
}
ANY_PHASE = frozenset({Ping, Error})


class AddressGossip(Protocol):
    """Where a session keeps the listen addresses members announce
    (:class:`backer.connections.addresses.AddressBook`)."""

    def announcements(self) -> list[bytes]:
        """This device's own signed announcement (if it listens) and the newest held of
        every other device."""
        ...

    def is_news(self, device: bytes, time_ms: int) -> bool:
        """Whether an announcement of ``device`` made at ``time_ms`` would be kept."""
        ...

    def heard(self, announcement: Announcement) -> bool:
        """Keep a verified member's announcement if it is news; whether it was."""
        ...

    def learn(self, device: bytes, host: str, port: int, source: str) -> bool:
        """Remember that ``device`` may be reached at ``host``:``port``."""
        ...


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
        addresses: AddressGossip | None = None,
    ) -> None:
        """``welcome``: the peer just joined with an invite; start by giving it the key.
        ``peer``: its authenticated device key, when a channel established one.
        ``replicator``: shared with the device's other open sessions (else a private one).
        ``addresses``: where announcements are kept and taken from (else they are checked
        and dropped)."""
        self.share = share
        self.peer = peer
        self.addresses = addresses
        self.remote_host: str | None = None  # the peer's IP, when it connected to us
        self.peer_announced = False  # its own announcement was read (with remote_host)
        self.welcome = welcome
        self.replicator = replicator or Replicator(share)
        self.replicator.attach(self)
        self.name = name
        self.stats = WireStats()
        self.outbox: list[Message] = []
        self.forks: list[str] = []
        self.peer_lengths: dict[bytes, int] | None = None
        self.peer_caught_up = False
        self.catching_up = 0  # grows each time the peer's catch-up moves forward: see
        self.sent_up_to: dict[bytes, int] = {}  # _on_events (per author: the end of what
        # it sent in this session)
        self.pending_run: dict[bytes, list[bytes]] = {}  # events awaiting their run's end
        self.pending_bytes = self.pending_events = 0  # (what they hold, how many)
        self.events_messages_sent = 0
        self.events_messages_received = 0
        self.acknowledged_up_to = 0  # the Events messages our last Done acknowledged
        self.messages_received = 0  # every message of the peer but its Pings
        self.peer_acknowledged = -1
        self.peer_files_written = 0
        self.peer_need: tuple[int, int] | None = None  # (files, bytes) it last said it needs
        self.peer_need_peak = (0, 0)  # the most it needed since it last needed nothing
        self.need_sent: tuple[int, int] | None = None
        self.bytes_in_flight = 0  # chunk bytes asked of this peer (kept by the replicator)
        self.chunks_in_flight = 0  # requests outstanding with this peer, and since when it
        self.manifests_in_flight = 0  # last answered one (None: nothing outstanding)
        self.waiting_since: float | None = None
        self.lazy = False  # the transport builds replies as its output drains
        self.owed: deque[tuple[int, bytes]] = deque()  # requests of the peer not yet answered
        self.read_ahead: dict[bytes, bytes | memoryview] = {}  # owed chunks already read
        self.bodies_ahead: dict[bytes, bytes | None] = {}  # owed manifests already read
        self.sending_part: tuple[bytes, bytes, int] | None = None  # id, body, offset
        self.receiving_part: tuple[bytes, int, bytearray] | None = None  # id, total, so far
        self.peer_summary: dict[bytes, Checkpoint] = {}  # checked claims, until the last part
        self.sending: deque[Iterator[Message]] = deque()  # Events (and CaughtUp) to build
        self.phase = OPENING  # what the peer may send next: see LEGAL

    # -- driving ------------------------------------------------------------------------

    def start(self) -> list[Message]:
        checkpoints = [c.encode() for c in self.share.journal.summary().values()]
        opening: list[Message] = [Welcome(self.share.share_key)] if self.welcome else []
        parts = _parts(checkpoints, _blob_size, REPLY_BYTES)
        summary = [Summary(part, int(i < len(parts) - 1)) for i, part in enumerate(parts)]
        return [*opening, Hello(PROTOCOL_VERSION, self.name.encode()), *summary]

    @property
    def complete(self) -> bool:
        """A one-shot sync may end: both sides caught up and applied, nothing owed."""
        return self._ours_done and self.peer_acknowledged == self.events_messages_sent

    @property
    def awaiting_courtesy(self) -> bool:
        """Complete but for the peer's ``Done``, which would acknowledge nothing: no
        ``Events`` were sent to it (a joiner's case). A peer that never sends it holds
        nothing of ours, so the wait for it is bounded (``transport.Hub.run``)."""
        return self._ours_done and self.events_messages_sent == 0 and self.peer_acknowledged < 0

    @property
    def awaiting_acknowledgement(self) -> bool:
        """Every ``Events`` message owed to the peer was built, and some of them it has
        not acknowledged (``Done``) yet. An honest peer talks while it takes them in
        (requests, chunks, what it still needs); one that only pings is bounded
        (``transport.Hub.run``)."""
        return self.peer_acknowledged < self.events_messages_sent and not self.sending

    @property
    def holding_run(self) -> bool:
        """Events of the peer wait, unverified, for the end of their run: an honest peer
        ends each run within its message, so one that never ends is bounded
        (``transport.Hub.run``), as the bytes and events it may hold are (R70)."""
        return bool(self.pending_run)

    @property
    def _ours_done(self) -> bool:
        return self.peer_caught_up and self.replicator.idle and not (self.owed or self.sending)

    @property
    def backlog(self) -> bool:
        """Messages remain to be built for the peer as its output drains. A chunk
        request waits while the share writes a scan's chunk index (Share.indexing):
        read before, a chunk just recorded would be answered as missing."""
        held = bool(self.owed) and self.owed[0][0] == _CHUNK and self.share.indexing
        return bool(self.sending) or (bool(self.owed) and not held)

    def overdue(self, now: float, limit: float) -> bool:
        """Whether requests to this peer have gone unanswered for ``limit`` seconds."""
        return self.waiting_since is not None and now - self.waiting_since > limit

    def receive(self, message: Message) -> list[Message]:
        """Handle one message from the peer; return what to send back to it.

        Other sessions sharing the replicator may have messages in their ``outbox``
        afterwards (relayed events, chunk requests): the transport flushes those."""
        kind = type(message)
        if kind not in LEGAL[self.phase] and kind not in ANY_PHASE:
            raise ProtocolError(f"unexpected {kind.__name__} {PHASE_NAMES[self.phase]}")
        self.messages_received += kind is not Ping
        replies = getattr(self, f"_on_{kind.__name__.lower()}")(message)
        self.outbox += replies  # after what was queued before (e.g. our own Hello)
        return self.take_outbox(0 if self.lazy else None)

    def take_outbox(self, budget: int | None = None) -> list[Message]:
        """The messages queued for the peer, then events it lacks, then replies to its
        requests: all of them (``budget`` None), or about ``budget`` bytes of them (one
        at least, if positive)."""
        out, self.outbox = self.outbox, []
        built = 0
        while self.backlog and (budget is None or built < budget):
            message = self._build()
            if message is not None:
                built += message.size() if budget is not None else 0
                out.append(message)
        return out

    def _build(self) -> Message | None:
        """The next message owed to the peer: events first (it needs them to ask for
        anything), then replies to its requests; None when a finished source was dropped."""
        if self.sending:
            message = next(self.sending[0], None)
            if message is None:
                self.sending.popleft()
            return message
        return self._reply()

    def close(self) -> None:
        """The connection is gone: hand what was asked of this peer to the others, and
        let go of what its messages left buffered (events awaiting their run's end,
        chunks and manifests read ahead), whoever still holds the session."""
        self.replicator.detach(self)
        self.pending_run, self.pending_bytes, self.pending_events = {}, 0, 0
        self.read_ahead, self.bodies_ahead = {}, {}
        self.receiving_part = self.sending_part = None
        self.peer_summary = {}

    # -- journal exchange ---------------------------------------------------------------

    def _on_hello(self, message: Hello) -> list[Message]:
        if message.version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"peer speaks protocol {message.version}, we speak {PROTOCOL_VERSION}"
            )
        self.phase = SUMMARY
        return []

    def _on_welcome(self, message: Welcome) -> list[Message]:
        if self.share.share_key or len(message.share_key) != 32:
            raise ProtocolError("unexpected Welcome")
        self.share.set_share_key(message.share_key)
        return []

    def _on_summary(self, message: Summary) -> list[Message]:
        if self.peer_lengths is not None:
            raise ProtocolError("a second summary")
        self._take_claims(message.checkpoints)
        if message.more:
            return []
        self.phase = SYNCING
        peer, self.peer_summary = self.peer_summary, {}
        ranges, forks = self.share.journal.missing_for(peer)
        self.peer_lengths = {author: c.length for author, c in peer.items()}
        self.catching_up += 1
        for fork in forks:
            self.peer_lengths[fork.author] = _NEVER
            self.forks.append(fork.author.hex())
        known = self.addresses.announcements()[:MAX_ANNOUNCEMENTS] if self.addresses else []
        gossip: list[Message] = [Addresses(known)] if known else []
        self._send_events(ranges)
        self.after_events(CaughtUp(), *gossip)  # after the events: the peer then knows the
        return []  # members

    def _take_claims(self, raws: list[bytes]) -> None:
        """Check and keep the peer's checkpoints as each part arrives. A share never has
        more than ``MAX_MEMBERS`` authors, so a summary naming more (or one twice) is
        refused: a flood of claimed authors costs neither memory nor signature checks."""
        try:
            for raw in raws:
                claim = Checkpoint.decode(raw)
                if claim.author in self.peer_summary:
                    raise ProtocolError("a summary names an author twice")
                if len(self.peer_summary) >= MAX_MEMBERS:
                    raise ProtocolError(f"a summary of more than {MAX_MEMBERS} authors")
                self.peer_summary.update(self.share.journal.check_summary([claim]))
        except (JournalError, ValueError) as exc:
            raise ProtocolError(f"bad summary: {exc}") from exc

    def _send_events(self, ranges: list[Range]) -> None:
        """Queue ``ranges`` for the peer; their messages are built as it takes them."""
        assert self.peer_lengths is not None
        for r in ranges:
            self.peer_lengths[r.author] = max(self.peer_lengths.get(r.author, 0), r.end)
        if ranges:
            self.sending.append(self._events_for(ranges))

    def after_events(self, *messages: Message) -> None:
        """Send ``messages`` once the events queued so far are sent (the ``outbox`` goes
        before them: requests and acknowledgements need not wait)."""
        self.sending.append(iter(messages))

    def _events_for(self, ranges: list[Range]) -> Iterator[Message]:
        """Events messages for ``ranges``: runs of one author in our arrival order, each
        cut by count and bytes; the checkpoint rides on a run's last message. A full
        message ends its run at the last checkpoint it holds, if the author signed one
        there: the peer verifies and applies a message's worth at a time (a new device
        took the founder's 1,000,000 files as one run, applied in one call that held
        its event loop for minutes), one signature check still vouching for each run.
        A full message that holds none (one append larger than a message: a prune's
        UNHELD events) ends its run all the same, without a checkpoint: the peer checks
        each event's own signature. So no run spans messages, and the peer never holds
        events unverified while it waits for the rest (which it bounds: R70)."""
        part: list[Event] = []
        size = 0
        for event in self.share.journal.in_ranges(ranges):
            if part and event.author != part[0].author:
                yield self._events_message(part, self._checkpoint_after(part))
                part, size = [], 0
            elif part and (
                len(part) >= EVENTS_PER_MESSAGE
                or size + _event_size(event) > EVENT_BYTES_PER_MESSAGE
            ):
                checkpoint = self.share.journal.last_checkpoint_within(
                    part[0].author, part[0].seq + 1, part[-1].seq + 1
                )
                cut = len(part) if checkpoint is None else checkpoint.length - part[0].seq
                yield self._events_message(part[:cut], checkpoint)
                part = part[cut:]
                size = sum(map(_event_size, part))
            part.append(event)
            size += _event_size(event)
        if part:
            yield self._events_message(part, self._checkpoint_after(part))

    def _checkpoint_after(self, part: list[Event]) -> Checkpoint | None:
        """The author's signed checkpoint just after ``part``, if this device holds one."""
        return self.share.journal.checkpoint_at(part[0].author, part[-1].seq + 1)

    def _events_message(self, part: list[Event], checkpoint: Checkpoint | None) -> Events:
        self.stats.events_sent += len(part)
        self.events_messages_sent += 1
        raw_checkpoint = checkpoint.encode() if checkpoint else b""
        return Events(raw_checkpoint, [e.raw for e in part], 0)

    def _on_events(self, message: Events) -> list[Message]:
        self.events_messages_received += 1
        if not message.events or len(message.events) > EVENTS_PER_MESSAGE:
            raise ProtocolError(
                f"an Events message of {len(message.events)} events (1 to "
                f"{EVENTS_PER_MESSAGE} are sent)"
            )
        try:
            author = Event.decode(message.events[0]).author
            end = Event.decode(message.events[-1]).seq + 1
        except ValueError as exc:
            raise ProtocolError(f"malformed event: {exc}") from exc
        if end > self.sent_up_to.get(author, 0):  # further than before: a stream moves on,
            self.sent_up_to[author] = end  # a message sent again and again does not
            self.catching_up += 1
        run = self.pending_run.setdefault(author, [])
        run.extend(message.events)
        self.pending_bytes += _held(message.events)
        self.pending_events += len(message.events)
        if self.pending_bytes > MAX_PENDING_BYTES or self.pending_events > MAX_PENDING_EVENTS:
            raise ProtocolError(
                f"events awaiting the end of their run exceed the session's cap "
                f"({MAX_PENDING_EVENTS} events, {MAX_PENDING_BYTES >> 20} MiB)"
            )
        if message.more:
            return []
        del self.pending_run[author]
        self.pending_bytes -= _held(run)
        self.pending_events -= len(run)
        try:
            checkpoint = Checkpoint.decode(message.checkpoint) if message.checkpoint else None
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
        if not result.added:
            self.replicator.acknowledge(self)
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

    def _on_ping(self, message: Ping) -> list[Message]:
        return []

    def tell_need(self, files: int, size: int) -> None:
        """Tell the peer what this device still needs, if that changed since it was last
        told (and only once the peer's summary arrived: it then expects any message)."""
        if self.peer_lengths is not None and self.need_sent != (files, size):
            self.need_sent = (files, size)
            self.outbox.append(Need(files, size))

    def keepalive(self) -> Message:
        """What keeps the connection alive when nothing was sent for a while: a ``Ping``;
        or, while events the peer sent wait to be applied here (no ``Done`` for them
        yet), what this device still needs, again. That is not a ``Ping``, so the peer's
        acknowledgement deadline sees this device at work: waiting on chunks a third
        device holds back (a member answering one chunk every 100 s), it was cut every
        240 s for what that device did (R71)."""
        if self.peer_lengths is None or self.events_messages_received <= self.acknowledged_up_to:
            return Ping()
        self.need_sent = self.replicator.need()
        return Need(*self.need_sent)

    def _on_need(self, message: Need) -> list[Message]:
        need = (message.files, message.file_bytes)
        peak = self.peer_need_peak if need != (0, 0) else (0, 0)
        self.peer_need_peak = (max(peak[0], need[0]), max(peak[1], need[1]))
        self.peer_need = need
        return []

    def _on_addresses(self, message: Addresses) -> list[Message]:
        """Keep the news among members' announcements and relay it to this share's other
        sessions; from a peer that connected to us, also its IP with its announced ports
        (once per session). A malformed or forged announcement closes the session; one of
        a non-member (e.g. removed since), of this device or no newer than the one held
        is ignored, before its signature is checked. Without an address book, nothing is
        kept: the announcements are dropped unread."""
        if len(message.announcements) > MAX_ANNOUNCEMENTS:
            raise ProtocolError("too many address announcements at once")
        book = self.addresses
        if book is None:
            return []
        news: list[bytes] = []
        for raw in message.announcements:
            try:
                device, time_ms = Announcement.claims(raw)
                inbound = self.remote_host is not None and device == self.peer
                inbound = inbound and not self.peer_announced
                if not inbound and not book.is_news(device, time_ms):
                    continue
                announcement = Announcement.decode(raw)
            except ValueError as exc:
                raise ProtocolError(f"bad address announcement: {exc}") from exc
            if announcement.share_id != self.share.share_id:
                raise ProtocolError("an address announcement of another share")
            if device not in self.share.members or device == self.share.device:
                continue
            if inbound and self.remote_host is not None:
                self.peer_announced = True
                for port in dict.fromkeys(port for _, port in announcement.addresses):
                    book.learn(device, self.remote_host, port, "inbound")
            if book.heard(announcement):
                news.append(raw)
        if news:
            for session in self.replicator.sessions:
                if session is not self and session.addresses is not None:
                    session.after_events(Addresses(news))
        return []

    def _on_error(self, message: Error) -> list[Message]:
        raise ProtocolError(f"peer closed the session: {message.reason.decode(errors='replace')}")

    # -- serving content ----------------------------------------------------------------

    def _on_wantmanifests(self, message: WantManifests) -> list[Message]:
        if len(message.ids) > MANIFESTS_PER_REQUEST:
            raise ProtocolError("too many manifests asked at once")
        self._owe(_MANIFEST, message.ids)
        return []

    def _on_wantchunks(self, message: WantChunks) -> list[Message]:
        if len(message.hashes) > CHUNKS_PER_REQUEST:
            raise ProtocolError("too many chunks asked at once")
        self._owe(_CHUNK, message.hashes)
        return []

    def _owe(self, kind: int, keys: list[bytes]) -> None:
        if len(self.owed) + len(keys) > MAX_OWED:
            raise ProtocolError(f"more than {MAX_OWED} requests outstanding")
        self.owed.extend((kind, key) for key in keys)

    def _read_ahead(self) -> None:
        """Read the chunks of the requests at the head of the queue (one peer's request
        at most) in one go: one index query, each file opened once, contiguous chunks in
        one read (:meth:`~backer.scanner.chunks.ChunkStore.read_many`). A chunk no local
        file holds is answered empty."""
        keys: list[bytes] = []
        for kind, key in self.owed:
            if kind != _CHUNK or len(keys) == CHUNKS_PER_REQUEST:
                break
            keys.append(key)
        found = self.replicator.store.read_many(keys)
        self.read_ahead = {key: found.get(key, b"") for key in keys}

    def _chunks(self) -> Chunks:
        """The chunks owed at the head of the queue, read together (:meth:`_read_ahead`):
        as many as one read brought, up to ``CHUNKS_BYTES`` (one at least)."""
        hashes: list[bytes] = []
        data: list[bytes | memoryview] = []
        size = 0
        while self.owed and self.owed[0][0] == _CHUNK:
            key = self.owed[0][1]
            if key not in self.read_ahead:
                if hashes:
                    break  # (the next message reads the next request's)
                self._read_ahead()
            found = self.read_ahead[key]
            if hashes and size + len(found) > CHUNKS_BYTES:
                break
            self.owed.popleft()
            del self.read_ahead[key]
            hashes.append(key)
            data.append(found)
            size += len(found)
        self.stats.chunk_bytes_sent += size
        return Chunks(hashes, data)

    def _manifest_body(self, manifest_id: bytes) -> bytes:
        """The manifest owed at the head of the queue (empty: not held here). The small
        ones owed behind it are read with it, in one query; a larger one, or one not
        found then, is looked up alone (at the time it is sent)."""
        if manifest_id not in self.bodies_ahead:
            keys = []
            for kind, key in self.owed:
                if kind != _MANIFEST or len(keys) == MANIFESTS_PER_REQUEST:
                    break
                keys.append(key)
            found = self.share.catalog.manifest_bodies(keys, BATCHED_MANIFEST_BYTES)
            self.bodies_ahead = {key: found.get(key) for key in keys}
        body = self.bodies_ahead.get(manifest_id)
        if body is None:
            manifest = self.share.catalog.manifest(manifest_id)
            return manifest.encoded if manifest else b""
        return body

    def _reply(self) -> Message:
        """The next reply owed: chunks, a batch of manifests, or a slice of a large one."""
        kind, key = self.owed[0]
        if kind == _CHUNK:
            return self._chunks()
        if self.sending_part is None:
            body = self._manifest_body(key)
            if len(body) > REPLY_BYTES:
                self.sending_part = (key, body, 0)
        if self.sending_part is not None:
            key, body, offset = self.sending_part
            end = offset + REPLY_BYTES
            self.sending_part = (key, body, end) if end < len(body) else None
            if self.sending_part is None:
                self.owed.popleft()
            return ManifestPart(key, len(body), body[offset:end])
        ids: list[bytes] = []
        bodies: list[bytes] = []
        size = 0
        while self.owed and self.owed[0][0] == _MANIFEST and len(ids) < MANIFESTS_PER_REQUEST:
            body = self._manifest_body(self.owed[0][1])
            if ids and (len(body) > REPLY_BYTES or size + len(body) > REPLY_BYTES):
                break
            ids.append(self.owed.popleft()[1])
            bodies.append(body)
            size += len(body) + 40
        return Manifests(ids, bodies)

    # -- fetching -------------------------------------------------------------------------

    def _on_manifests(self, message: Manifests) -> list[Message]:
        if len(message.ids) != len(message.bodies):
            raise ProtocolError("manifest ids and bodies differ in number")
        self.replicator.manifests_arrived(self, message.ids, message.bodies)
        self.share.db.conn.commit()
        self.replicator.advance()
        return []

    def _on_manifestpart(self, message: ManifestPart) -> list[Message]:
        if message.total > MAX_MANIFEST_BYTES or not message.data:
            raise ProtocolError("a manifest part is empty or its manifest too large")
        if self.receiving_part is None:
            if self.replicator.manifests_asked.get(message.id) is not self:
                raise ProtocolError("a manifest we did not ask for")
            self.receiving_part = (message.id, message.total, bytearray())
        manifest_id, total, body = self.receiving_part
        if (manifest_id, total) != (message.id, message.total):
            raise ProtocolError("parts of two manifests interleaved")
        body += message.data
        if len(body) > total:
            raise ProtocolError("a manifest's parts exceed its size")
        if len(body) < total:
            return []
        self.receiving_part = None
        return self._on_manifests(Manifests([manifest_id], [bytes(body)]))

    def _on_chunks(self, message: Chunks) -> list[Message]:
        if len(message.hashes) != len(message.data):
            raise ProtocolError("chunk hashes and data differ in number")
        self.replicator.chunks_arrived(self, message.hashes, message.data)
        return []

    def push(self) -> None:
        """Queue the events this device holds that the peer has not been sent: its own
        new local changes, resolutions, or events another session brought in. Sessions
        are long-lived: call this whenever the journal grows. Nothing to a removed device."""
        if self.peer_lengths is None or (
            self.peer is not None and self.peer not in self.share.members
        ):
            return
        ranges = []
        for author, checkpoint in self.share.journal.summary().items():
            have = self.peer_lengths.get(author, 0)
            if have < checkpoint.length:
                ranges.append(Range(author, have, checkpoint.length))
        self._send_events(ranges)
