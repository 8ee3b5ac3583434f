"""The API's reads of a share's database, off the node's event loop.

A view that reads more than a few rows must not hold the loop: while it runs, no
session is served and no change is applied. So every listing, page of the journal,
conflict list and share total is read in one worker thread, through a read-only SQLite
connection of its own per share (WAL: it never waits for the node's writes, nor they
for it), and answers what was committed when it began.

What scans the whole share (totals by kind, the conflicts) is kept per share and read
again only once the journal has grown: every change of the live set is a journal event,
so the journal's last position says whether a cached answer still holds.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from backer.db.catalog import Catalog
from backer.fs.paths import METADATA_DIR
from backer.model import revisions
from backer.model.records import Version
from backer.model.share import DB_FILE
from backer.node import commands
from backer.numbers import natural
from journal.event import Event

T = TypeVar("T")


class Cursor:
    """Where a page of the journal starts: before event ``position`` (None: the newest),
    or, with ``skip``, inside that event after its first ``skip`` changes (an event may
    hold 100,000s: a page is bounded by the changes it returns, not by events).
    Written ``POSITION`` or ``POSITION.SKIP``."""

    def __init__(self, position: int | None = None, skip: int = 0) -> None:
        self.position, self.skip = position, skip

    @classmethod
    def parse(cls, text: str | None) -> Cursor:
        """The cursor ``text`` spells (None: the newest); a ValueError if not one."""
        if text is None:
            return cls()
        first, dot, rest = text.partition(".")
        position, skip = natural(first), natural(rest) if dot else 0
        if position is None or skip is None or max(position, skip) >= 1 << 62:
            raise ValueError(text)
        return cls(position, skip)

    def __str__(self) -> str:
        return f"{self.position}.{self.skip}" if self.skip else str(self.position)


@dataclass
class Page:
    events: list[tuple[int, Event, list[tuple[str, str, Version]], int]]  # (position,
    # event, its changes on this page, how many of its changes came before them)
    next: Cursor | None
    change_types: dict[str, str] = field(default_factory=dict)  # version id -> what it did


@dataclass
class Cached:
    """What was read of one share that scans it whole, and as of which position."""

    position: int = -1  # the journal position these answers are of
    counts: dict[str, int] | None = None
    conflicts: list[revisions.Conflict] | None = None


class Reader:
    """The worker thread and its connections (one per share database)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="backer-api-reads")
        self._catalogs: dict[Path, Catalog] = {}  # only ever touched in the worker
        self._cached: dict[Path, Cached] = {}

    async def run(self, root: Path, work: Callable[[Catalog, Cached], T]) -> T:
        """``work(catalog, cache)`` in the worker thread, for the share at ``root``."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._in_worker, root, work)

    def _in_worker(self, root: Path, work: Callable[[Catalog, Cached], T]) -> T:
        catalog = self._catalogs.get(root)
        if catalog is None:
            database = os.fspath(root / METADATA_DIR / DB_FILE)
            uri = f"file:{urllib.parse.quote(database)}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=5)
            catalog = self._catalogs[root] = Catalog(
                sqlite_utils.Database(conn, execute_plugins=False), migrate=False
            )
        cached = self._cached.setdefault(root, Cached())
        with catalog.conn:  # one read transaction: one snapshot for the whole answer
            catalog.conn.execute("BEGIN")
            position = _last_position(catalog.conn)
            if position != cached.position:
                cached.position, cached.counts, cached.conflicts = position, None, None
            return work(catalog, cached)

    async def close(self) -> None:
        """Close every connection (in the worker, which made them), then the thread."""

        def close_all() -> None:
            for catalog in self._catalogs.values():
                catalog.conn.close()
            self._catalogs.clear()

        await asyncio.get_running_loop().run_in_executor(self._pool, close_all)
        self._pool.shutdown()


def _last_position(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COALESCE(MAX(rowid), 0) FROM events").fetchone()[0]


def conflicts(catalog: Catalog, cached: Cached) -> list[revisions.Conflict]:
    """Every conflict of the share (read again only once the journal grew)."""
    if cached.conflicts is None:
        cached.conflicts = revisions.conflicts(catalog)
    return cached.conflicts


def counts(catalog: Catalog, cached: Cached) -> dict[str, int]:
    """The share's totals (live entries by kind, bytes) and how many conflicts."""
    if cached.counts is None:
        cached.counts = {**catalog.totals(), "conflicts": len(conflicts(catalog, cached))}
    return cached.counts


def share_state(root: Path) -> Callable[[Catalog, Cached], tuple[dict[str, int], dict[str, Any]]]:
    """The reads a share's status needs: :func:`counts`, and what the share lists that
    this device does not hold (read each time: the journal does not grow as files land)."""

    def read(catalog: Catalog, cached: Cached) -> tuple[dict[str, int], dict[str, Any]]:
        return counts(catalog, cached), commands.not_here(catalog, root)

    return read


def conflicted(catalog: Catalog, cached: Cached) -> set[str]:
    """Every path that is part of a conflict: its own, and each of its copies'."""
    found: set[str] = set()
    for conflict in conflicts(catalog, cached):
        found |= {conflict.path, *(c.copy_path for c in conflict.contenders if c.copy_path)}
    return found


def _events_from(conn: sqlite3.Connection, start: int, top: str, catalog: Catalog) -> Iterator[int]:
    """The positions of the journal from ``start`` down (``top``: only the events that
    touched it or below it, from the path index)."""
    if top:
        yield from catalog.positions_under(top, start + 1)
        return
    for (position,) in conn.execute(
        "SELECT rowid FROM events WHERE rowid <= ? ORDER BY rowid DESC", (start,)
    ):
        yield position


def changes_page(
    catalog: Catalog, cursor: Cursor, limit: int, top: str, author: bytes | None
) -> Page:
    """At most ``limit`` changes of the journal, newest event first, from ``cursor``:
    only events by ``author`` (None: any) and changes at ``top`` or below it ("": any).
    An event without changes (a membership event) counts as one. ``next``: where the
    following page starts (None: this one ends the journal)."""
    conn = catalog.conn
    start = _last_position(conn) if cursor.position is None else cursor.position
    skip = cursor.skip
    if cursor.position is not None and not skip:
        start -= 1  # (before that event)
    page = Page([], None)
    left = limit
    for position in _events_from(conn, start, top, catalog):
        if left == 0:
            page.next = Cursor(page.events[-1][0]) if page.events else None
            break
        row = conn.execute("SELECT raw FROM events WHERE rowid = ?", (position,)).fetchone()
        if row is None:
            continue
        event = Event.decode(row[0])
        if author is not None and event.author != author:
            skip = 0
            continue
        versions = catalog.versions_at(position, top, skip, left + 1)
        if top and not versions:
            skip = 0
            continue
        shown = versions[:left]
        page.events.append((position, event, shown, skip))
        if len(versions) > left:  # the event goes on: the next page resumes inside it
            page.next = Cursor(position, skip + left)
            break
        left -= max(1, len(shown))
        skip = 0
    for _, _, shown, _ in page.events:
        for _, vid, version in shown:
            page.change_types[vid] = catalog.change_type(version)
    return page
