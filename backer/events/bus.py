"""The node's event bus: what happens in a running node, as a stream anyone can follow.

The web API's ``/api/events`` and any other front end (``async for event in
node.events()``) read the same stream. Events live in a bounded ring buffer; each has
an id larger than every earlier one, also across restarts of the node (ids start from
the clock in microseconds), so a subscriber that comes back with the last id it saw
gets everything after it that is still buffered, and is told by a ``missed`` event when
some of it is no longer there (or when its id is not one of this node's).

Publishing is synchronous and happens on the node's event loop; subscribers are async
generators that wait on an :class:`asyncio.Event` renewed at every publish.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

CAPACITY = 4096  # events kept for subscribers that resume
REPLAY = 256  # events a new subscription replays at most (older ones: one ``missed``)
PATHS_PER_EVENT = 100  # an event names at most this many paths (and counts them all)


class EventType(StrEnum):
    LOCAL_CHANGE = "local-change"  # a scan recorded changes made on this device
    REMOTE_APPLIED = "remote-applied"  # versions from other devices were written here
    DEVICE_CONNECTED = "device-connected"
    DEVICE_DISCONNECTED = "device-disconnected"
    TRANSFER_PROGRESS = "transfer-progress"  # at most one per PROGRESS_INTERVAL_S
    DEVICE_STATE = "device-state"  # what a connected device says it still needs changed
    CONFLICT_APPEARED = "conflict-appeared"  # concurrent versions kept as conflict copies
    CONFLICT_RESOLVED = "conflict-resolved"  # someone chose (here: the API's resolve)
    SCAN_STARTED = "scan-started"
    SCAN_FINISHED = "scan-finished"
    PAUSED = "paused"
    RESUMED = "resumed"
    ERROR = "error"  # a file could not be recorded or applied; a share is not served
    MISSED = "missed"  # to one subscriber: events it did not get are gone


@dataclass(frozen=True)
class Event:
    id: int
    type: EventType
    time_ms: int
    share: str | None  # the share's name (None: the node itself)
    data: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": str(self.type),
            "time_ms": self.time_ms,
            "share": self.share,
            **self.data,
        }


def paths(names: list[str]) -> dict[str, Any]:
    """A list of paths for an event: at most PATHS_PER_EVENT of them, and how many."""
    return {"paths": names[:PATHS_PER_EVENT], "count": len(names)}


class EventBus:
    """A bounded, resumable stream of :class:`Event` (one per node)."""

    def __init__(self, capacity: int = CAPACITY, first_id: int | None = None) -> None:
        self._buffer: deque[Event] = deque(maxlen=capacity)
        self._next = first_id if first_id is not None else time.time_ns() // 1000
        self._first = self._next  # the first id of this bus: an older one is not ours
        self._wake = asyncio.Event()
        self._closed = False

    @property
    def last_id(self) -> int:
        """The id of the newest event (one less than the first id if there is none)."""
        return self._next - 1

    def publish(self, kind: EventType, share: str | None = None, **data: Any) -> Event:
        """Record an event and wake every subscriber (call on the node's loop)."""
        event = Event(self._next, kind, time.time_ns() // 1_000_000, share, data)
        self._next += 1
        self._buffer.append(event)
        self._wake.set()
        self._wake = asyncio.Event()
        return event

    def close(self) -> None:
        """End every subscription once it has taken what is buffered (the node stops)."""
        self._closed = True
        self._wake.set()

    async def subscribe(self, since: int | None = None) -> AsyncIterator[Event]:
        """Every event after ``since`` (None: from now on), then each new one as it is
        published, until the bus is closed. Events after ``since`` that are no longer
        buffered, or a ``since`` from another run of the node, are announced by one
        ``missed`` event (its id: the last one missed, so a resume from it is exact).
        At most :data:`REPLAY` buffered events are replayed (older ones are announced
        as ``missed``, "too old"): a whole buffer cost the loop ~50 ms per request."""
        cursor = self.last_id if since is None else since
        if cursor > self.last_id or cursor < self._first - 1:
            # not an id of ours: everything we have is new (the newest REPLAY of it)
            cursor = max(self._first - 1, self.last_id - REPLAY)
            yield self._missed(cursor, "unknown", since)
        floor = self.last_id - REPLAY  # for the first round only
        while True:
            wake = self._wake
            oldest = self._buffer[0].id if self._buffer else self._next
            if cursor + 1 < max(oldest, floor + 1):
                last = max(oldest - 1, floor)
                yield self._missed(
                    last, "dropped" if cursor + 1 < oldest else "too old", cursor + 1
                )
                cursor = last
            floor = 0
            for event in list(self._buffer)[max(0, cursor + 1 - oldest) :]:
                cursor = event.id
                yield event
            if cursor == self.last_id:
                if self._closed:
                    return
                await wake.wait()

    def _missed(self, last: int, why: str, first: int | None) -> Event:
        return Event(
            last,
            EventType.MISSED,
            time.time_ns() // 1_000_000,
            None,
            {"reason": why, "first": first, "last": last},
        )
