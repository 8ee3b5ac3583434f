"""Per-author, hash-chained, signed append-only logs in one SQLite database.

Schema and tooling go through sqlite-utils; the hot paths (ingest, reads) use the
plain ``sqlite3`` connection underneath, which is several times faster per row.

Storage keeps, per author, the events (``raw`` is exactly what was signed), the peaks
of the merkle tree at the current length, every tree node of depth
>= ``KEEP_DEPTH`` (so the root at any earlier length costs at most a few dozen leaf
reads), the latest signed checkpoint, and evidence of any fork seen.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nacl.signing
import sqlite_utils

from .event import NO_PREVIOUS, Checkpoint, Event, InvalidEvent
from .merkle import Peaks, depth, leaf_span, peak_indices, subtree_hash

KEEP_DEPTH = 5
PAGE_EVENTS = 1024  # events read at once by a catch-up (see in_ranges)
PAGE_BYTES = 1 << 20
# Pages the write-ahead log may hold before it is copied into the database (SQLite's
# default is 1,000). A bulk scan or sync dirties the same index pages in commit after
# commit; a checkpoint copies each page once however often the log holds it, so a larger
# log copies fewer: at 100,000 files a join wrote 20 % less, a first scan 23 % less
# (docs/benchmarks.md). The log is cut back to this size after a checkpoint.
WAL_PAGES = 16384


class JournalError(Exception):
    """Base class for journal failures that callers report rather than crash on."""


class RejectedBatch(JournalError):
    """A received batch failed verification; nothing of it was stored."""


class CorruptJournal(JournalError):
    """Stored events no longer match their hashes, chain or signed checkpoint."""


@dataclass(frozen=True)
class Fork:
    """Evidence that one author signed two different histories."""

    author: bytes
    seq: int
    ours: bytes
    theirs: bytes


@dataclass(frozen=True)
class Range:
    """Events ``[start, end)`` of ``author``'s log."""

    author: bytes
    start: int
    end: int


@dataclass
class IngestResult:
    added: list[Event] = field(default_factory=list)
    duplicates: int = 0
    forks: list[Fork] = field(default_factory=list)


@dataclass
class _AuthorState:
    rowid: int
    peaks: Peaks
    head: bytes
    checkpoint: Checkpoint | None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Journal:
    """The journal of one device: every author's log it has verified."""

    def __init__(self, database: str | Path | sqlite_utils.Database) -> None:
        """Open (creating if needed) the journal tables in ``database``.

        Pass a :class:`sqlite_utils.Database` to share one connection with the
        application's own tables.
        """
        if isinstance(database, sqlite_utils.Database):
            self.db = database
        else:
            self.db = sqlite_utils.Database(str(database), execute_plugins=False)
        self.conn: sqlite3.Connection = self.db.conn
        try:
            self.db.enable_wal()
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
            self.conn.execute(f"PRAGMA journal_size_limit={WAL_PAGES * 4096}")
            self.conn.execute("PRAGMA cache_size=-65536")  # 64 MiB: bulk ingest is ~1.5x faster
            self._create_schema()
        except sqlite3.DatabaseError as exc:
            raise CorruptJournal(f"journal database is unreadable: {exc}") from exc

    def _create_schema(self) -> None:
        with self.conn:
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS quarantine (author BLOB, seq INTEGER, reason TEXT, "
                "PRIMARY KEY (author, seq)) WITHOUT ROWID"
            )
        if "authors" in self.db.table_names():
            return
        with self.conn:
            self.db["authors"].create(
                {"id": int, "key": bytes, "peaks": bytes, "head": bytes, "checkpoint": bytes},
                pk="id",
            )
            self.db["authors"].create_index(["key"], unique=True)
            self.db["events"].create(
                {"rowid": int, "author": int, "seq": int, "id": bytes, "raw": bytes}, pk="rowid"
            )
            self.db["events"].create_index(["author", "seq"], unique=True)
            self.conn.execute(
                "CREATE TABLE nodes (author INTEGER, idx INTEGER, hash BLOB, "
                "PRIMARY KEY (author, idx)) WITHOUT ROWID"
            )
            self.conn.execute(
                "CREATE TABLE checkpoints (author INTEGER, length INTEGER, raw BLOB, "
                "PRIMARY KEY (author, length)) WITHOUT ROWID"
            )
            self.db["forks"].create(
                {"author": bytes, "seq": int, "ours": bytes, "theirs": bytes, "seen_ms": int}
            )

    def close(self) -> None:
        self.conn.close()

    # -- reading -----------------------------------------------------------------

    def _author(self, author: bytes) -> _AuthorState | None:
        row = self.conn.execute(
            "SELECT id, peaks, head, checkpoint FROM authors WHERE key = ?", (author,)
        ).fetchone()
        if row is None:
            return None
        checkpoint = Checkpoint.decode(row[3]) if row[3] else None
        return _AuthorState(row[0], Peaks.decode(row[1]), row[2], checkpoint)

    def authors(self) -> list[bytes]:
        return [r[0] for r in self.conn.execute("SELECT key FROM authors ORDER BY id")]

    def length(self, author: bytes) -> int:
        state = self._author(author)
        return state.peaks.length if state else 0

    def summary(self) -> dict[bytes, Checkpoint]:
        """Latest signed checkpoint per author: what a peer needs to find what it lacks."""
        rows = self.conn.execute("SELECT key, checkpoint FROM authors WHERE checkpoint IS NOT NULL")
        return {key: Checkpoint.decode(raw) for key, raw in rows}

    def events(self, author: bytes, start: int = 0, end: int | None = None) -> Iterator[Event]:
        state = self._author(author)
        if state is None:
            return
        stop = state.peaks.length if end is None else end
        rows = self.conn.execute(
            "SELECT raw FROM events WHERE author = ? AND seq >= ? AND seq < ? ORDER BY seq",
            (state.rowid, start, stop),
        )
        for (raw,) in rows:
            yield Event.decode(raw)

    def since(self, position: int = 0) -> Iterator[tuple[int, Event]]:
        """Events stored after local position ``position``, in the order they arrived."""
        rows = self.conn.execute(
            "SELECT rowid, raw FROM events WHERE rowid > ? ORDER BY rowid", (position,)
        )
        for rowid, raw in rows:
            yield rowid, Event.decode(raw)

    def newest_first(self, before: int | None = None) -> Iterator[tuple[int, Event]]:
        """Events stored before local position ``before`` (None: all), newest first."""
        rows = self.conn.execute(
            "SELECT rowid, raw FROM events WHERE rowid < ? ORDER BY rowid DESC",
            (before if before is not None else 1 << 62,),
        )
        for rowid, raw in rows:
            yield rowid, Event.decode(raw)

    def checkpoint_at(self, author: bytes, length: int) -> Checkpoint | None:
        """The author's signed checkpoint at exactly ``length``, if we ever stored one."""
        row = self.conn.execute(
            "SELECT c.raw FROM checkpoints c JOIN authors a ON a.id = c.author "
            "WHERE a.key = ? AND c.length = ?",
            (author, length),
        ).fetchone()
        return Checkpoint.decode(row[0]) if row else None

    def last_checkpoint_within(self, author: bytes, low: int, high: int) -> Checkpoint | None:
        """The author's signed checkpoint of the greatest length in ``[low, high]`` that
        we stored, if any: where a long run of its events can end."""
        row = self.conn.execute(
            "SELECT c.raw FROM checkpoints c JOIN authors a ON a.id = c.author "
            "WHERE a.key = ? AND c.length BETWEEN ? AND ? ORDER BY c.length DESC LIMIT 1",
            (author, low, high),
        ).fetchone()
        return Checkpoint.decode(row[0]) if row else None

    def in_ranges(self, ranges: list[Range]) -> Iterator[Event]:
        """The events of ``ranges``, in the order they arrived here (a causal order),
        short of any quarantined event and the rest of its author's log (never relayed).

        Read a page at a time (at most ``PAGE_EVENTS`` events and ``PAGE_BYTES`` bytes,
        one event at least), no statement held open in between: a catch-up of the
        whole journal holds one page, and the journal may grow while it is consumed."""
        held = self.quarantine_starts()
        ids = {key: rowid for rowid, key in self.conn.execute("SELECT id, key FROM authors")}
        bounds = [
            (ids[r.author], r.start, min(r.end, held.get(r.author, r.end)))
            for r in ranges
            if r.author in ids
        ]
        bounds = [bound for bound in bounds if bound[1] < bound[2]]
        if not bounds:
            return
        # ``+author``: walk the rows in arrival order from ``last`` (an index on author
        # would collect and sort every wanted row again for each page)
        clauses = " OR ".join("(+author = ? AND seq >= ? AND seq < ?)" for _ in bounds)
        params = [value for bound in bounds for value in bound]
        firsts = [  # start at the earliest event wanted: no scan of the older ones
            self.conn.execute(
                "SELECT rowid FROM events WHERE author = ? AND seq = ?", (author, start)
            ).fetchone()
            for author, start, _ in bounds
        ]
        last = min((row[0] for row in firsts if row), default=1) - 1
        while True:
            sizes = self.conn.execute(
                f"SELECT rowid, length(raw) FROM events WHERE rowid > ? AND ({clauses}) "
                "ORDER BY rowid LIMIT ?",
                [last, *params, PAGE_EVENTS],
            ).fetchall()
            if not sizes:
                return
            cut, total = sizes[0][0], 0
            for rowid, size in sizes:
                if total and total + size > PAGE_BYTES:
                    break
                cut, total = rowid, total + size
            rows = self.conn.execute(
                f"SELECT raw FROM events WHERE rowid > ? AND rowid <= ? AND ({clauses}) "
                "ORDER BY rowid",
                [last, cut, *params],
            ).fetchall()
            last = cut
            for (raw,) in rows:
                yield Event.decode(raw)

    # -- quarantine: stored events that cannot be applied --------------------------

    def quarantine(self, events: Iterable[Event], reason: str) -> None:
        """Set stored events aside: never applied again, never relayed (nor anything of
        their author's log after them). Inside the caller's transaction."""
        self.conn.executemany(
            "INSERT OR IGNORE INTO quarantine (author, seq, reason) VALUES (?, ?, ?)",
            [(e.author, e.seq, reason) for e in events],
        )

    def quarantine_starts(self) -> dict[bytes, int]:
        """Per author with quarantined events, the first one's sequence number."""
        rows = self.conn.execute("SELECT author, min(seq) FROM quarantine GROUP BY author")
        return dict(rows.fetchall())

    def quarantined(self) -> list[tuple[bytes, int, str]]:
        """Every quarantined ``(author, seq, reason)``, for reports."""
        return self.conn.execute(
            "SELECT author, seq, reason FROM quarantine ORDER BY author, seq"
        ).fetchall()

    def position(self) -> int:
        """The local arrival position of the newest stored event."""
        return self.conn.execute("SELECT coalesce(max(rowid), 0) FROM events").fetchone()[0]

    def count(self) -> int:
        return self.conn.execute("SELECT count(*) FROM events").fetchone()[0]

    def forks(self) -> list[Fork]:
        rows = self.conn.execute("SELECT author, seq, ours, theirs FROM forks ORDER BY rowid")
        return [Fork(*row) for row in rows]

    def root_at(self, author: bytes, length: int) -> bytes:
        """Merkle root of the first ``length`` events of ``author``'s log."""
        state = self._author(author)
        if state is None or length > state.peaks.length:
            raise ValueError("log is shorter than the requested length")
        if length == state.peaks.length:
            return state.peaks.root()
        hashes = []
        for index in peak_indices(length):
            if depth(index) >= KEEP_DEPTH:
                row = self.conn.execute(
                    "SELECT hash FROM nodes WHERE author = ? AND idx = ?", (state.rowid, index)
                ).fetchone()
                hashes.append(row[0])
            else:
                start, end = leaf_span(index)
                leaves = self.conn.execute(
                    "SELECT id FROM events WHERE author = ? AND seq >= ? AND seq < ? ORDER BY seq",
                    (state.rowid, start, end),
                ).fetchall()
                hashes.append(subtree_hash([leaf for (leaf,) in leaves]))
        return Peaks(length, list(zip(peak_indices(length), hashes, strict=True))).root()

    def missing_for(self, peer: dict[bytes, Checkpoint]) -> tuple[list[Range], list[Fork]]:
        """The ranges a peer with summary ``peer`` lacks, and forks its summary reveals.

        The peer's checkpoints must already be signature-checked (see
        :meth:`check_summary`). A peer whose log of an author is not a prefix of ours
        gets nothing of that author: its history and ours diverge.
        """
        ranges, forks = [], []
        for author, ours in self.summary().items():
            theirs = peer.get(author)
            their_length = theirs.length if theirs else 0
            diverged = (
                theirs is not None
                and 0 < their_length <= ours.length
                and self.root_at(author, their_length) != theirs.root
            )
            if diverged:
                forks.append(Fork(author, their_length, ours.encode(), theirs.encode()))
                continue
            if their_length < ours.length:
                ranges.append(Range(author, their_length, ours.length))
        for fork in forks:
            self._record_fork(fork)
        return ranges, forks

    @staticmethod
    def check_summary(summary: Iterable[Checkpoint]) -> dict[bytes, Checkpoint]:
        """Verify a peer's checkpoints; raise :class:`RejectedBatch` on any bad one."""
        checked = {}
        for checkpoint in summary:
            try:
                checkpoint.verify()
            except InvalidEvent as exc:
                raise RejectedBatch(f"checkpoint of {checkpoint.author.hex()[:16]}: {exc}") from exc
            checked[checkpoint.author] = checkpoint
        return checked

    # -- writing -----------------------------------------------------------------

    def append(
        self,
        key: nacl.signing.SigningKey,
        entries: Sequence[tuple[int, bytes]],
        time_ms: int | None = None,
        alongside: Callable[[list[Event]], None] | None = None,
    ) -> list[Event]:
        """Sign ``(kind, payload)`` entries onto our own log, with one checkpoint.

        ``alongside`` runs inside the append's transaction with the new events: what
        the application derives from them commits with them, or neither does."""
        author = bytes(key.verify_key)
        state = self._author(author)
        seq = state.peaks.length if state else 0
        prev = state.head if state else NO_PREVIOUS
        stamp = _now_ms() if time_ms is None else time_ms
        events = []
        for kind, payload in entries:
            event = Event.create(key, seq, prev, stamp, kind, payload)
            events.append(event)
            seq, prev = seq + 1, event.id
        peaks = state.peaks.copy() if state else Peaks()
        nodes = peaks.extend([e.id for e in events], KEEP_DEPTH)
        checkpoint = Checkpoint.create(key, peaks.length, peaks.root())
        with self.conn:
            self._store(author, state, events, peaks, nodes, checkpoint)
            if alongside is not None:
                alongside(events)
        return events

    def ingest(
        self,
        raw_events: Sequence[bytes],
        checkpoint: Checkpoint | None,
        is_member: Callable[[bytes], bool],
        admit: Callable[[list[Event]], None] | None = None,
    ) -> IngestResult:
        """Verify and store one author's events; idempotent, all or nothing.

        ``admit`` sees the new events once they are verified and before anything is
        stored; it raises :class:`RejectedBatch` to refuse them all (payload checks).

        With a ``checkpoint`` covering the batch's end, one signature check vouches
        for every event (their ids are leaves of the signed root); without one, each
        event's own signature is checked. Events we already hold are skipped; a
        different event at a sequence number we hold is recorded as a fork and not
        stored.
        """
        try:
            events = sorted((Event.decode(raw) for raw in raw_events), key=lambda e: e.seq)
        except InvalidEvent as exc:
            raise RejectedBatch(str(exc)) from exc
        if not events:
            return IngestResult()
        author = events[0].author
        if any(e.author != author for e in events):
            raise RejectedBatch("a batch must hold one author's events")
        if not is_member(author):
            raise RejectedBatch(f"author {author.hex()[:16]} is not a member")
        if checkpoint is not None and checkpoint.author != author:
            raise RejectedBatch("checkpoint is signed by another author")
        state = self._author(author)
        stored = state.peaks.length if state else 0
        if checkpoint is not None:
            try:
                checkpoint.verify()
            except InvalidEvent as exc:
                raise RejectedBatch(f"checkpoint: {exc}") from exc
        result = IngestResult()
        for event in (e for e in events if e.seq < stored):
            assert state is not None
            ours = self.conn.execute(
                "SELECT id, raw FROM events WHERE author = ? AND seq = ?", (state.rowid, event.seq)
            ).fetchone()
            if ours[0] == event.id:
                result.duplicates += 1
                continue
            try:
                event.verify()
            except InvalidEvent as exc:
                raise RejectedBatch(f"event {event.seq}: {exc}") from exc
            result.forks.append(Fork(author, event.seq, ours[1], event.raw))
        stale_checkpoint_diverges = (
            checkpoint is not None
            and not result.forks
            and checkpoint.length <= stored
            and self.root_at(author, checkpoint.length) != checkpoint.root
        )
        if stale_checkpoint_diverges:
            assert checkpoint is not None and state is not None
            ours_signed = state.checkpoint.encode() if state.checkpoint else b""
            result.forks.append(Fork(author, checkpoint.length, ours_signed, checkpoint.encode()))
        if result.forks:
            for fork in result.forks:
                self._record_fork(fork)
            return result
        fresh = [e for e in events if e.seq >= stored]
        peaks = state.peaks.copy() if state else Peaks()
        head = state.head if state else NO_PREVIOUS
        for event in fresh:
            if event.seq != stored:
                raise RejectedBatch(f"gap in log: expected event {stored}, got {event.seq}")
            if event.prev != head:
                raise RejectedBatch(f"event {event.seq} does not chain to event {event.seq - 1}")
            head = event.id
            stored += 1
        leaves = [event.id for event in fresh]
        nodes: list[tuple[int, bytes]] = []
        if checkpoint is not None and peaks.length < checkpoint.length <= stored:
            nodes += peaks.extend(leaves[: checkpoint.length - peaks.length], KEEP_DEPTH)
            if peaks.root() != checkpoint.root:
                raise RejectedBatch("events do not match the signed checkpoint root")
        nodes += peaks.extend(leaves[len(leaves) - (stored - peaks.length) :], KEEP_DEPTH)
        if checkpoint is not None and checkpoint.length > peaks.length:
            raise RejectedBatch("checkpoint covers events that are not in the batch")
        vouched = checkpoint.length if checkpoint is not None else 0
        for event in fresh:
            if event.seq >= vouched:  # not covered by the checkpoint: check its own signature
                try:
                    event.verify()
                except InvalidEvent as exc:
                    raise RejectedBatch(f"event {event.seq}: {exc}") from exc
        if fresh and admit is not None:
            admit(fresh)
        if fresh:
            covers_all = checkpoint is not None and checkpoint.length == peaks.length
            kept_checkpoint = checkpoint if covers_all else (state.checkpoint if state else None)
            with self.conn:
                self._store(author, state, fresh, peaks, nodes, kept_checkpoint)
            result.added = fresh
        return result

    def _store(
        self,
        author: bytes,
        state: _AuthorState | None,
        events: list[Event],
        peaks: Peaks,
        nodes: list[tuple[int, bytes]],
        checkpoint: Checkpoint | None,
    ) -> None:
        encoded_checkpoint = checkpoint.encode() if checkpoint else None
        if state is None:
            rowid = self.conn.execute(
                "INSERT INTO authors (key, peaks, head, checkpoint) VALUES (?, ?, ?, ?)",
                (author, peaks.encode(), events[-1].id, encoded_checkpoint),
            ).lastrowid
        else:
            rowid = state.rowid
            self.conn.execute(
                "UPDATE authors SET peaks = ?, head = ?, checkpoint = ? WHERE id = ?",
                (peaks.encode(), events[-1].id, encoded_checkpoint, rowid),
            )
        self.conn.executemany(
            "INSERT INTO events (author, seq, id, raw) VALUES (?, ?, ?, ?)",
            [(rowid, e.seq, e.id, e.raw) for e in events],
        )
        self.conn.executemany(
            "INSERT INTO nodes (author, idx, hash) VALUES (?, ?, ?)",
            [(rowid, index, digest) for index, digest in nodes],
        )
        if checkpoint is not None:
            self.conn.execute(
                "INSERT OR IGNORE INTO checkpoints (author, length, raw) VALUES (?, ?, ?)",
                (rowid, checkpoint.length, encoded_checkpoint),
            )

    def _record_fork(self, fork: Fork) -> None:
        with self.conn:
            exists = self.conn.execute(
                "SELECT 1 FROM forks WHERE author = ? AND seq = ? AND theirs = ?",
                (fork.author, fork.seq, fork.theirs),
            ).fetchone()
            if not exists:
                self.conn.execute(
                    "INSERT INTO forks (author, seq, ours, theirs, seen_ms) VALUES (?, ?, ?, ?, ?)",
                    (fork.author, fork.seq, fork.ours, fork.theirs, _now_ms()),
                )

    # -- integrity -----------------------------------------------------------------

    def verify(self) -> int:
        """Re-check every stored event against ids, chains, trees and checkpoints.

        Returns the number of events checked; raises :class:`CorruptJournal`.
        """
        checked = 0
        for author in self.authors():
            state = self._author(author)
            assert state is not None
            peaks, head = Peaks(), NO_PREVIOUS
            checkpoint = state.checkpoint
            rows = self.conn.execute(
                "SELECT seq, id, raw FROM events WHERE author = ? ORDER BY seq", (state.rowid,)
            )
            for seq, stored_id, raw in rows:
                where = f"event {seq} of {author.hex()[:16]}"
                try:
                    event = Event.decode(raw)
                except InvalidEvent as exc:
                    raise CorruptJournal(f"{where}: {exc}") from exc
                expected = (author, seq, head, stored_id)
                if (event.author, event.seq, event.prev, event.id) != expected:
                    raise CorruptJournal(f"{where}: id or chain does not match")
                if checkpoint is None or seq >= checkpoint.length:
                    try:
                        event.verify()
                    except InvalidEvent as exc:
                        raise CorruptJournal(f"{where}: {exc}") from exc
                head = event.id
                peaks.push(event.id)
                at_checkpoint = checkpoint is not None and peaks.length == checkpoint.length
                if at_checkpoint and peaks.root() != checkpoint.root:
                    raise CorruptJournal(f"{where}: log does not match its signed root")
                checked += 1
            if peaks.encode() != state.peaks.encode() or head != state.head:
                raise CorruptJournal(f"log of {author.hex()[:16]} is truncated or altered")
            if checkpoint is not None:
                try:
                    checkpoint.verify()
                except InvalidEvent as exc:
                    raise CorruptJournal(f"checkpoint of {author.hex()[:16]}: {exc}") from exc
        return checked
