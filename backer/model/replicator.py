"""Bring one share's files in line with its state, fetching content from every peer at hand.

A device may hold several sessions at once (``serve`` accepts many; ``sync`` dials every
known peer). They share one :class:`Replicator`: one plan, one queue of wanted chunks,
one materialization at a time — so two sessions never race to write the same file —
and chunk requests spread over all sessions whose peer has caught us up, each to the
session with the fewest bytes in flight (faster peers drain sooner and get more). A peer
that lacks a chunk or manifest answers empty; it is then asked of another peer, and given
up only when every connected peer lacked it (the file waits for a later sync).

Sans-IO like the session: it never touches a socket. It appends messages to the
``outbox`` of the sessions it speaks through; the transport flushes every outbox after
each step. Events a session brings in are relayed to the other sessions at once
(:meth:`journal_grew`), which is how ``serve`` passes one peer's changes on to another.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from blake3 import blake3

from backer.db.catalog import Problem
from backer.model.materializer import (
    LEFT_OUT,
    Assembly,
    DiskFull,
    Materializer,
    Operation,
    Plan,
    Report,
    discard_temp,
    plan,
)
from backer.model.records import Kind
from backer.model.share import Share
from backer.protocol.wire import (
    CHUNKS_PER_REQUEST,
    Done,
    ProtocolError,
    WantChunks,
    WantManifests,
)
from backer.scanner.chunks import ChunkStore
from backer.scanner.content import BadManifest, Manifest, check_manifest
from backer.scanner.ignore import IGNORE_FILE, IgnoreRules

if TYPE_CHECKING:
    from backer.protocol.session import Session

MANIFESTS_PER_REQUEST = 500
MAX_BYTES_IN_FLIGHT = 16 * 1024 * 1024  # per peer: requests stop there until chunks arrive
REFILL_BYTES = 4 * 1024 * 1024  # a peer is asked again once this much of its window
# arrived (or CHUNKS_PER_REQUEST chunks): one request per ~64 chunks, not one per chunk
MAX_CHUNKS_IN_FLIGHT = 4096  # per peer, however small the chunks (a peer queues at most
MANIFESTS_IN_FLIGHT = 2000  # session.MAX_OWED requests of ours)
WINDOW_FILES = 2_000  # (see docs/decisions.md, "Large plans are applied in windows")
WINDOW_BYTES = 1024 * 1024 * 1024


def _bytes_of(op: Operation) -> int:
    """What applying ``op`` writes, for :meth:`Replicator.need`."""
    return op.version.size if op.version.kind == Kind.FILE else 0


class ChunkSink(Protocol):
    """Where chunks fetched outside the plan go (the bytes of an old version to restore,
    see :class:`backer.model.revisions.Fetched`)."""

    wanted: dict[bytes, int]  # hash -> length, still to arrive

    def place(self, chunk_hash: bytes, data: bytes | memoryview) -> None: ...

    def unavailable(self, chunk_hash: bytes) -> None: ...


@dataclass
class ApplyStats:
    files_to_write: int = 0  # planned (files, links, directories), and those written
    files_written: int = 0
    files_deleted: int = 0
    chunks_reused: int = 0
    conflicts_resolved: int = 0
    bytes_to_fetch: int = 0  # chunk bytes planned to arrive, and those that did (progress)
    bytes_fetched: int = 0
    local_edits_kept: int = 0  # (counted here: the windows' reports are handed on, not held)


class Replicator:
    """The materialization of one share, shared by all of its open sessions."""

    def __init__(self, share: Share) -> None:
        self.share = share
        self.store = ChunkStore(share.root, share.catalog)
        self.sessions: list[Session] = []
        self.stats = ApplyStats()
        self.reports: list[Report] = []
        self.edits_kept: set[str] = set()  # paths the last plan left to a local edit
        self.dirty = False
        self.folder_in_the_way = False  # a write of this plan met a folder not yet emptied
        self.operations: Plan | None = None
        self.manifests_asked: dict[bytes, Session] = {}
        self.manifest_queue: deque[bytes] = deque()  # needed, not yet asked of a peer
        self.chunk_queue: deque[bytes] = deque()
        self.chunk_lengths: dict[bytes, int] = {}  # of the chunks planned, from manifests
        self.assembly: Assembly | None = None  # temp files of the plan, filling up
        self.chunks_asked: dict[bytes, Session] = {}
        self.lacking: dict[bytes, set[Session]] = {}  # chunk or manifest -> peers without it
        self.bad_manifests: dict[bytes, str] = {}  # content id -> why its chunk list was refused
        self.gave_up = False  # content no peer had at the last try: ask again when one writes
        self.awaited = 0  # peers being dialled that have not caught us up yet: plan after them
        self.disk_full: DiskFull | None = None  # why the last plan stopped or left files
        self.short_of_room = 0  # out (the disk), and how many bytes more those files need
        self.sinks: list[ChunkSink] = []  # chunks wanted outside the plan (a restore)
        self.sink_queue: deque[bytes] = deque()
        self.sink_asked: dict[bytes, Session] = {}
        self.sink_lacking: dict[bytes, set[Session]] = {}
        self.needed = (0, 0)  # (files, bytes) of the last plan not applied yet: counts, not
        # a dict of every path (a first sync of 100,000 files held one for its whole length)
        self.window_operations: list[Operation] = []  # the window being assembled
        self.wake: Callable[[], None] | None = None  # (I/O edge) from a worker thread: a
        # local copy ended; with none, the copies are waited for

    @property
    def idle(self) -> bool:
        return self.operations is None and not self.dirty and not self.sinks

    def attach(self, session: Session) -> None:
        self.sessions.append(session)

    def detach(self, session: Session) -> None:
        """A session ended: what it was asked goes to the remaining peers."""
        if session not in self.sessions:
            return
        self.sessions.remove(session)
        for table, queue in (
            (self.manifests_asked, self.manifest_queue),
            (self.chunks_asked, self.chunk_queue),
        ):
            for key in [k for k, asker in table.items() if asker is session]:
                del table[key]
                self.lacking.setdefault(key, set()).add(session)
                queue.appendleft(key)
        for key in [k for k, asker in self.sink_asked.items() if asker is session]:
            del self.sink_asked[key]
            self.sink_lacking.setdefault(key, set()).add(session)
            self.sink_queue.appendleft(key)
        session.chunks_in_flight = session.manifests_in_flight = session.bytes_in_flight = 0
        session.waiting_since = None
        self.advance()

    def peer_wrote_files(self) -> None:
        """A peer wrote files since it last said so: try again what it lacked then.

        (A peer that relays events to us may receive their content only after.)"""
        if self.gave_up:
            self.dirty = True
            self.advance()

    def journal_grew(self) -> None:
        """New events are in the journal (received, scanned or resolved): relay them."""
        self.dirty = True
        self._push()

    def _push(self) -> None:
        for session in self.sessions:
            session.push()

    # -- the steps ------------------------------------------------------------------------

    def _fetchers(self) -> list[Session]:
        return [s for s in self.sessions if s.peer_caught_up]

    def retrieve(self, sink: ChunkSink) -> None:
        """Fetch ``sink.wanted`` from the caught-up peers, outside the plan: each chunk is
        asked of one peer after another until one has it (``sink.place``) or every
        connected peer lacked it (``sink.unavailable``). The sink is dropped once
        nothing it wants is outstanding."""
        self.sinks.append(sink)
        self.sink_queue.extend(sink.wanted)
        self._request_for_sinks()

    def _request_for_sinks(self) -> None:
        batches: dict[Session, list[bytes]] = {}
        fetchers = self._fetchers()
        while self.sink_queue and fetchers:
            chunk_hash = self.sink_queue.popleft()
            wanting = [s for s in self.sinks if chunk_hash in s.wanted]
            if not wanting or chunk_hash in self.sink_asked:
                continue
            lacking = self.sink_lacking.get(chunk_hash, set())
            session = min(
                (s for s in fetchers if s not in lacking),
                key=lambda s: s.bytes_in_flight,
                default=None,
            )
            if session is None:
                for sink in wanting:
                    sink.unavailable(chunk_hash)
                continue
            self.sink_asked[chunk_hash] = session
            self._ask(session, chunk_hash, wanting[0].wanted[chunk_hash], batches)
        self._send(batches)
        self.sinks = [s for s in self.sinks if s.wanted]

    def _sink_chunk(
        self, session: Session, chunk_hash: bytes, data: bytes | memoryview
    ) -> None:
        """A chunk asked for a sink arrived (empty: that peer lacks it)."""
        del self.sink_asked[chunk_hash]
        wanting = [s for s in self.sinks if chunk_hash in s.wanted]
        length = wanting[0].wanted[chunk_hash] if wanting else len(data)
        session.bytes_in_flight -= length
        session.chunks_in_flight -= 1
        self._answered(session, bool(data))
        if blake3(data).digest() == chunk_hash and len(data) == length:
            for sink in wanting:
                sink.place(chunk_hash, data)
            session.stats.chunk_bytes_received += len(data)
            session.stats.chunks_fetched += 1
        elif data:
            raise ProtocolError("a chunk does not match its hash")
        else:
            self.sink_lacking.setdefault(chunk_hash, set()).add(session)
            self.sink_queue.appendleft(chunk_hash)
        self._request_for_sinks()

    def advance(self) -> None:
        """Move the materialization forward as far as it can go without waiting."""
        if self.sinks:
            self._request_for_sinks()
        try:
            self._advance()
        except DiskFull as problem:
            self._stop(problem)

    def _stop(self, problem: DiskFull) -> None:
        """The disk is full: the plan stops (the assembly removed its temp files), what
        was applied is committed, the sessions go on; a later plan tries again."""
        self.disk_full = problem
        self.share.db.conn.commit()
        if self.assembly is not None:
            report = self.assembly.report
            done = {*report.written, *(problem.path for problem in report.errors)}
            report.errors += [  # (a write that met the full disk left them out)
                Problem(op.path, LEFT_OUT)
                for op in self.window_operations
                if op.version.kind == Kind.FILE and op.path not in done
            ]
            self._took(report)
        self._drop_plan()
        self.assembly = None
        self.share.temps_in_use = set()
        self.chunk_queue.clear()
        self.dirty = False
        self._push()  # what the plan's resolution recorded goes out even so
        self._acknowledge()

    def abandon(self) -> None:
        """The process stops: the window in progress is given up and its temp files are
        removed, as are those kept for a later attempt (what was applied stays; the next
        run plans again and fetches what is missing). A worker thread's late wake does
        nothing after this."""
        self.wake = None
        if self.assembly is not None:
            self.assembly.abort()
            self.share.note_applied(self.assembly.report)
        self.share.db.conn.commit()
        self._drop_plan()
        self.assembly = None
        self.share.temps_in_use = set()
        for temp in self.share.resumable_temps:
            discard_temp(temp)
        self.share.resumable_temps.clear()

    def _advance(self) -> None:
        while self._fetchers():
            if self.share.root_moved() is not None:  # nothing written into whatever is
                return  # there now (the node stops serving the share, see Runtime.check_root)
            if self.operations is None:
                if not self.dirty or self.awaited or self.chunks_asked:  # (asked before a stop)
                    return
                if self.share.indexing:  # its own new files' chunks are not found yet: a
                    return  # window would ask the peers for them (the scan advances after)
                if self.share.own_events_missing or self.share.repairing:  # restored from
                    self.dirty = False  # an older copy, or being repaired: nothing is applied
                    self._acknowledge()  # (its scan cache would misjudge its disk)
                    return
                self._plan()
            self._request_manifests()
            if self.manifests_asked or self.manifest_queue:
                return
            if self.assembly is None:
                self._start_window()
            self._request_chunks()
            if self.wake is not None and self.assembly.commit_complete():  # (waited for
                self.share.db.conn.commit()  # without a loop: the window then ends at once)
            if self.chunk_queue or self.chunks_asked or not self._copied():
                return
            self._finish_window()
            if self.operations is not None:
                continue  # the next window of the plan
            self._push()
            if not self.dirty:
                self._acknowledge()
                return

    def _acknowledge(self) -> None:
        """Tell every peer that what it sent has been taken in (``Done``)."""
        for session in self.sessions:
            self._done(session)

    def acknowledge(self, session: Session) -> None:
        """``session``'s peer sent events this device already held (another peer was
        quicker): nothing to apply, so unless a plan is pending (its end says ``Done``
        to everyone) say so now, or the peer's one-shot sync waits for it forever."""
        if self.idle:
            self._done(session)

    def _done(self, session: Session) -> None:
        session.tell_need(*self.need())  # (first: what it needs is current at Done)
        session.outbox.append(Done(session.events_messages_received, self.stats.files_written))
        session.acknowledged_up_to = session.events_messages_received

    def _plan(self) -> None:
        self.dirty = False
        self.folder_in_the_way = False
        self.edits_kept = set()  # (a later plan meets them again while they differ)
        self.disk_full = None
        self.short_of_room = 0
        self.chunk_queue.clear()  # (requests of a stopped plan that a lost peer handed back)
        resolved = self.share.resolve_conflicts()
        self.stats.conflicts_resolved += resolved
        excluded = IgnoreRules.load(self.share.root).excluded
        self.operations = plan(
            self.share.catalog, self.share.root, excluded, self.share.unwritable
        )
        self.needed = (self.operations.files, self.operations.bytes)
        self.share.note_planned(self.operations)
        self.stats.files_to_write += self.operations.writes
        self.lacking.clear()
        self.bad_manifests.clear()
        self.gave_up = False
        self.manifest_queue.extend(self.operations.manifests_needed(self.share.catalog))

    def _least_busy(self, key: bytes) -> Session | None:
        """The fetching session with the fewest bytes in flight that may have ``key``."""
        lacking = self.lacking.get(key, set())
        candidates = [s for s in self._fetchers() if s not in lacking]
        return min(candidates, key=lambda s: s.bytes_in_flight, default=None)

    def _ask(
        self, session: Session, chunk_hash: bytes, length: int, batches: dict[Session, list[bytes]]
    ) -> None:
        """Count a chunk as in flight from ``session`` and add it to that session's
        request, sent as soon as it holds :data:`CHUNKS_PER_REQUEST` (the rest by
        :meth:`_send`)."""
        session.bytes_in_flight += length
        session.chunks_in_flight += 1
        self._asked(session)
        batch = batches.setdefault(session, [])
        batch.append(chunk_hash)
        if len(batch) == CHUNKS_PER_REQUEST:
            session.outbox.append(WantChunks(batch))
            batches[session] = []

    @staticmethod
    def _send(batches: dict[Session, list[bytes]]) -> None:
        for session, batch in batches.items():
            if batch:
                session.outbox.append(WantChunks(batch))

    @staticmethod
    def _asked(session: Session) -> None:
        """A request went to ``session``: its answer is awaited from now on, unless an
        earlier one still is."""
        if session.waiting_since is None:
            session.waiting_since = time.monotonic()

    @staticmethod
    def _answered(session: Session, gave: bool) -> None:
        """An answer came from ``session``: the clock stops if nothing more is
        outstanding, and restarts only if the answer ``gave`` what was asked. One that
        says the peer lacks it does not: a member that answered 'lacking' to one chunk
        at a time, every 100 s, was never overdue, gave nothing, and held this device's
        window (and its acknowledgement of every other peer's events) for ever (R71)."""
        if not (session.chunks_in_flight or session.manifests_in_flight):
            session.waiting_since = None
        elif gave:
            session.waiting_since = time.monotonic()

    def _request_manifests(self) -> None:
        """Ask for queued manifests, up to MANIFESTS_IN_FLIGHT per peer."""
        batches: dict[Session, list[bytes]] = {}
        while self.manifest_queue:
            manifest_id = self.manifest_queue[0]
            session = self._least_busy(manifest_id)
            if session is None:  # no connected peer has it: the file waits
                self.manifest_queue.popleft()
                self.gave_up = True
                continue
            if session.manifests_in_flight >= MANIFESTS_IN_FLIGHT:
                break
            self.manifest_queue.popleft()
            self.manifests_asked[manifest_id] = session
            session.manifests_in_flight += 1
            self._asked(session)
            batches.setdefault(session, []).append(manifest_id)
        step = MANIFESTS_PER_REQUEST
        for session, wanted in batches.items():
            for i in range(0, len(wanted), step):
                session.outbox.append(WantManifests(wanted[i : i + step]))

    def _window(self) -> list[Operation]:
        """The next slice of the plan to assemble: up to WINDOW_FILES files or
        WINDOW_BYTES bytes, so that memory stays bounded and a long first sync keeps what
        it has written if it is interrupted. Deletions (last in a plan) come as one."""
        assert self.operations is not None
        return self.operations.take(WINDOW_FILES, WINDOW_BYTES)

    def progress(self) -> tuple[int, int, int, int]:
        """(files done, files planned, chunk bytes fetched, chunk bytes planned): a file
        of the current window is done once it has all its chunks, its local copy ended.
        The bytes planned are the chunks the windows so far fetch and all the bytes of the
        plan's files in no window yet (some may be found here): counting the first
        window's alone, a join of several windows showed its first as the whole, and a
        time left of seconds where minutes were to come."""
        files = self.stats.files_written
        if self.assembly is not None:
            assembly = self.assembly
            done = len(assembly.report.written)  # (moved into place early: commit_complete)
            files += done + len(assembly.staged) - assembly.waiting - assembly.copying()
        planned = self.stats.bytes_to_fetch
        if self.operations is not None:
            planned += self.operations.bytes_untaken
        return files, self.stats.files_to_write, self.stats.bytes_fetched, planned

    def need(self) -> tuple[int, int]:
        """(files, bytes) this device still has to write or delete: what the last plan
        holds that is not in place yet, including what it left out (no room, no peer had
        the content, an error); the next plan counts again. A file counts until its
        window is renamed into place: one complete in its temp file (a local copy still
        running, its check, its rename) is not on disk as the truth yet, and a peer told
        (0, 0) shows this device in sync."""
        return self.needed

    def _start_window(self) -> None:
        """Assemble the next window: temp files filled with every chunk found locally;
        the rest is queued for the peers."""
        catalog = self.share.catalog
        window, refused = [], []
        total = 0  # chunks of the window's files (those not fetched were found locally)
        operations = self._window()
        catalog.load_manifests(
            op.version.content for op in operations if op.version.kind == Kind.FILE
        )
        for op in operations:
            is_file = op.version.kind == Kind.FILE
            manifest = catalog.manifest(op.version.content) if is_file else None
            if not is_file or manifest is not None:
                window.append(op)
                total += len(manifest.chunks) if manifest is not None else 0
            elif op.version.content in self.bad_manifests:  # the author's own bad data
                reason = self.bad_manifests[op.version.content]
                refused.append(
                    Problem(op.path, f"not written: its chunk list is invalid: {reason}")
                )
            # else no peer had its chunk list yet: it waits for the next plan (one is made
            # when a peer writes), rather than failing as an error here
        materializer = Materializer(self.share.root, self.share.catalog, self.store)
        self.assembly = materializer.start(window, self.wake)
        self.assembly.report.errors.extend(refused)
        self.window_operations = window
        self.share.db.conn.commit()  # the directories it made are recorded for an off-loop
        # scan's reader too, or it takes them for absent and misses their deletion
        self.share.temps_in_use = {staged.temp.relative for staged in self.assembly.staged.values()}
        self.chunk_lengths = dict(self.assembly.missing)
        self.stats.bytes_to_fetch += sum(self.chunk_lengths.values())
        self.stats.chunks_reused += max(0, total - len(self.chunk_lengths))
        self.chunk_queue.extend(self.chunk_lengths)

    def _copied(self) -> bool:
        """Whether the window's local copies (worker threads) have ended; the chunks
        they found changed at every local place are then asked of the peers."""
        assert self.assembly is not None
        stale = self.assembly.settle(wait=self.wake is None)
        if stale is None:
            return False  # :attr:`wake` calls :meth:`advance` when they end
        if not stale:
            return True
        self.chunk_lengths.update(stale)
        self.stats.bytes_to_fetch += sum(stale.values())
        self.chunk_queue.extend(stale)
        self._request_chunks()
        return False

    @staticmethod
    def _refillable(session: Session) -> bool:
        """Whether a whole request's worth of ``session``'s window has arrived: asking
        for each chunk as another arrives would cost a message and a pass through the
        plan per chunk, each way."""
        return (
            session.bytes_in_flight <= MAX_BYTES_IN_FLIGHT - REFILL_BYTES
            and session.chunks_in_flight <= MAX_CHUNKS_IN_FLIGHT - CHUNKS_PER_REQUEST
        )

    def _request_chunks(self) -> None:
        """Ask the least busy peers for queued chunks, each up to its window, once it
        has room for a whole request (:meth:`_refillable`)."""
        batches: dict[Session, list[bytes]] = {}
        while self.chunk_queue:
            chunk_hash = self.chunk_queue[0]
            session = self._least_busy(chunk_hash)
            if session is None:  # no connected peer has it: the files needing it wait
                self.chunk_queue.popleft()
                self.gave_up = True
                continue
            if session not in batches and not self._refillable(session):
                break
            if (
                session.bytes_in_flight >= MAX_BYTES_IN_FLIGHT
                or session.chunks_in_flight >= MAX_CHUNKS_IN_FLIGHT
            ):
                break
            self.chunk_queue.popleft()
            self.chunks_asked[chunk_hash] = session
            self._ask(session, chunk_hash, self.chunk_lengths[chunk_hash], batches)
        self._send(batches)

    def _finish_window(self) -> None:
        assert self.operations is not None and self.assembly is not None
        report = self.assembly.finish()
        self.share.db.conn.commit()
        if self.assembly.short_of_room:  # files left out: the others were applied
            self.short_of_room += self.assembly.short_of_room
            self.disk_full = DiskFull(self.share.root, self.short_of_room)
        self.share.temps_in_use = set()
        self.assembly = None
        self._took(report)
        failed = {problem.path for problem in report.errors}
        done = [op for op in self.window_operations if op.path not in failed]  # applied, or
        files, size = self.needed  # moot (already so on disk)
        self.needed = (files - len(done), size - sum(map(_bytes_of, done)))
        self.window_operations = []
        self.stats.files_written += len(report.written)
        self.stats.files_deleted += len(report.deleted)
        self.share.resumable_temps.update(report.kept_temps)
        if IGNORE_FILE in report.written or IGNORE_FILE in report.deleted:
            self.dirty = True  # the rules changed: what they no longer ignore is planned now
        self.folder_in_the_way |= bool(report.folders_in_the_way)
        if report.deleted and self.folder_in_the_way:  # (the deletions: a later window)
            self.dirty = True  # what was below it may be gone now: the file goes in its place
        if not self.operations:
            self._drop_plan()
            self.share.sweep_resumable()  # a kept temp whose version was since replaced

    def _drop_plan(self) -> None:
        """The plan ended (applied, stopped or given up): its temporary database goes."""
        if self.operations is not None:
            self.operations.close()
        self.operations = None

    def _took(self, report: Report) -> None:
        """A window ended: its problems are kept, its report waits for the transport."""
        self.reports.append(report)
        self.stats.local_edits_kept += len(report.kept_local_edits)
        self.edits_kept.update(report.kept_local_edits)
        self.share.note_applied(report)

    # -- answers from peers ---------------------------------------------------------------

    def manifests_arrived(
        self, session: Session, manifest_ids: list[bytes], bodies: list[bytes]
    ) -> None:
        """Take in the manifests of one message from ``session`` (an empty body: that
        peer lacks it), stored with one statement (a first sync receives 100,000, and one
        statement each cost more than their checks)."""
        received = [
            manifest
            for manifest_id, body in zip(manifest_ids, bodies, strict=True)
            if (manifest := self._manifest_arrived(session, manifest_id, body)) is not None
        ]
        self.share.catalog.put_manifest_bodies(received)

    def _manifest_arrived(
        self, session: Session, manifest_id: bytes, body: bytes
    ) -> Manifest | None:
        """The manifest ``body`` holds, checked; None if the peer lacks it or its
        author made it invalid."""
        if self.manifests_asked.get(manifest_id) is not session:
            raise ProtocolError("a manifest we did not ask for")
        del self.manifests_asked[manifest_id]
        session.manifests_in_flight -= 1
        self._answered(session, bool(body))
        if not body:
            self.lacking.setdefault(manifest_id, set()).add(session)
            self.manifest_queue.appendleft(manifest_id)
            return None
        try:
            manifest = Manifest.decode(body)
        except ValueError as exc:
            raise ProtocolError(f"malformed manifest: {exc}") from exc
        if manifest.id != manifest_id:
            raise ProtocolError("a manifest does not match its id")
        try:  # the sender relays what a version's author made: that file's problem
            check_manifest(manifest)
        except BadManifest as exc:
            self.bad_manifests[manifest_id] = str(exc)
            return None
        return manifest

    def chunks_arrived(
        self, session: Session, hashes: list[bytes], data: list[bytes | memoryview]
    ) -> None:
        """Take in chunks from ``session`` (empty data: that peer lacks that one), then
        move on if that lets anything move: a request to refill the peer's window, the
        re-asking of a lacked chunk, the end of the window. Most arrivals only write
        their bytes: while a window drains (nothing left to ask) a refill would ask
        nothing."""
        lacked = False
        for chunk_hash, chunk in zip(hashes, data, strict=True):
            self._take_chunk(session, chunk_hash, chunk)
            lacked = lacked or not chunk
        refill = self.chunk_queue and self._refillable(session)
        if lacked or not self.chunks_asked or self.sinks or refill:
            self.advance()

    def _take_chunk(self, session: Session, chunk_hash: bytes, data: bytes | memoryview) -> None:
        if self.chunks_asked.get(chunk_hash) is not session and (
            self.sink_asked.get(chunk_hash) is session
        ):
            self._sink_chunk(session, chunk_hash, data)
            return
        if self.chunks_asked.get(chunk_hash) is not session:
            raise ProtocolError("a chunk we did not ask for")
        del self.chunks_asked[chunk_hash]
        session.bytes_in_flight -= self.chunk_lengths[chunk_hash]
        session.chunks_in_flight -= 1
        self._answered(session, bool(data))
        if not data:
            self.lacking.setdefault(chunk_hash, set()).add(session)
            self.chunk_queue.appendleft(chunk_hash)
            return
        if blake3(data).digest() != chunk_hash:
            raise ProtocolError("a chunk does not match its hash")
        if len(data) != self.chunk_lengths[chunk_hash]:  # the manifest lied: no peer can
            return  # give it otherwise; its files stay unwritten and are reported
        if self.assembly is None:  # the plan stopped (disk full) while this was on its way
            return
        try:
            self.assembly.place(chunk_hash, data)
        except DiskFull as problem:
            self._stop(problem)
            return
        self.stats.bytes_fetched += len(data)
        session.stats.chunk_bytes_received += len(data)
        session.stats.chunks_fetched += 1
