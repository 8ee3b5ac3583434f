"""The node's event bus: ordered, resumable, bounded, and fed by a real node."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

from backer.events import Event, EventBus, EventType
from backer.events.bus import CAPACITY, REPLAY
from tests.e2e import joined_pair, nodes_in_loop


async def take(events: AsyncIterator[Event], count: int, timeout: float = 5) -> list[Event]:
    taken: list[Event] = []
    async with asyncio.timeout(timeout):
        async for event in events:
            taken.append(event)
            if len(taken) == count:
                break
    return taken


def test_a_subscriber_from_now_gets_each_new_event_once_in_order() -> None:
    async def scenario() -> list[Event]:
        bus = EventBus(first_id=100)
        bus.publish(EventType.SCAN_STARTED, "s")  # before the subscription: not seen
        events = bus.subscribe()
        waiting = asyncio.ensure_future(take(events, 3))
        await asyncio.sleep(0)
        for n in range(3):
            bus.publish(EventType.LOCAL_CHANGE, "s", n=n)
        return await waiting

    got = asyncio.run(scenario())
    assert [e.data["n"] for e in got] == [0, 1, 2]
    assert [e.id for e in got] == [101, 102, 103]
    assert all(e.type == EventType.LOCAL_CHANGE and e.share == "s" for e in got)


def test_resuming_with_the_last_id_seen_misses_nothing_still_buffered() -> None:
    async def scenario() -> tuple[list[Event], list[Event]]:
        bus = EventBus(capacity=50, first_id=1)
        first = bus.subscribe(since=0)
        for n in range(10):
            bus.publish(EventType.LOCAL_CHANGE, "s", n=n)
        seen = await take(first, 4)
        await first.aclose()  # the client went away after event 4
        for n in range(10, 20):  # while it was away
            bus.publish(EventType.LOCAL_CHANGE, "s", n=n)
        resumed = await take(bus.subscribe(since=seen[-1].id), 16)
        return seen, resumed

    seen, resumed = asyncio.run(scenario())
    assert [e.data["n"] for e in seen + resumed] == list(range(20))
    assert not any(e.type == EventType.MISSED for e in resumed)


def test_a_subscriber_whose_events_left_the_buffer_is_told_what_it_missed() -> None:
    async def scenario() -> list[Event]:
        bus = EventBus(capacity=5, first_id=1)
        for n in range(12):
            bus.publish(EventType.LOCAL_CHANGE, "s", n=n)
        return await take(bus.subscribe(since=2), 6)

    got = asyncio.run(scenario())
    missed, rest = got[0], got[1:]
    assert missed.type == EventType.MISSED
    assert (missed.data["first"], missed.data["last"], missed.data["reason"]) == (3, 7, "dropped")
    assert missed.id == 7  # resuming from it is exact
    assert [e.id for e in rest] == [8, 9, 10, 11, 12]


def test_an_id_from_another_run_of_the_node_is_flagged_and_everything_buffered_follows() -> None:
    async def scenario() -> list[Event]:
        earlier = EventBus()
        earlier.publish(EventType.SCAN_STARTED)
        stale = earlier.last_id
        bus = EventBus()  # the node restarted: ids go on from the clock
        assert bus.last_id >= stale
        bus.publish(EventType.SCAN_STARTED)
        bus.publish(EventType.SCAN_FINISHED)
        return await take(bus.subscribe(since=stale - 5), 3)

    got = asyncio.run(scenario())
    assert [e.type for e in got] == [
        EventType.MISSED,
        EventType.SCAN_STARTED,
        EventType.SCAN_FINISHED,
    ]
    assert got[0].data["reason"] == "unknown"


def test_closing_the_bus_ends_subscriptions_after_what_is_buffered() -> None:
    async def scenario() -> list[Event]:
        bus = EventBus(first_id=1)
        events = bus.subscribe(since=0)
        bus.publish(EventType.SCAN_STARTED)
        bus.close()
        async with asyncio.timeout(2):
            return [e async for e in events]

    assert [e.type for e in asyncio.run(scenario())] == [EventType.SCAN_STARTED]


def test_a_running_node_publishes_connections_local_changes_and_applied_remote_ones(
    tmp_path: Path,
) -> None:
    """Two real nodes in one loop: a file written on a is a local change there and an
    applied remote change on b, and b's bus tells of the session with a."""
    a, b, ports = joined_pair(tmp_path)

    async def scenario() -> tuple[list[Event], list[Event], float]:
        nodes = nodes_in_loop((a, b), ports)
        stop = asyncio.Event()
        on_a, on_b = nodes[0].events(since=0), nodes[1].events(since=0)

        async def until(events: AsyncIterator[Event], wanted: EventType, **data: object) -> Event:
            async with asyncio.timeout(20):
                async for event in events:
                    if event.type == wanted and all(
                        event.data.get(k) == v for k, v in data.items()
                    ):
                        return event
            raise AssertionError(f"no {wanted}")

        async with asyncio.TaskGroup() as tasks:
            for node in nodes:
                tasks.create_task(node.run(stop))
            await nodes[0].started.wait()
            await nodes[1].started.wait()
            connected = await until(on_b, EventType.DEVICE_CONNECTED)
            await until(on_a, EventType.SCAN_FINISHED, full=True)
            (a.root / "note.txt").write_text("hello")
            local = await until(on_a, EventType.LOCAL_CHANGE, change="added")
            applied = await until(on_b, EventType.REMOTE_APPLIED, change="written")
            seen = time.time_ns() // 1_000_000
            stop.set()
        assert (b.root / "note.txt").read_text() == "hello"
        return [connected, applied], [local], seen - applied.time_ms

    (connected, applied), (local,), lag_ms = asyncio.run(scenario())
    assert connected.share == "b" and connected.data["name"]
    assert local.data["paths"] == ["note.txt"] and local.data["count"] == 1
    assert applied.data["paths"] == ["note.txt"]
    assert lag_ms < 1000


def test_R28_an_old_since_replays_at_most_REPLAY_events() -> None:
    """A stream opened with an old ``since`` replayed the whole 4,096-event buffer on the
    loop (~50 ms each); the newest REPLAY follow one ``missed`` now, whatever the id."""

    async def scenario(since: int) -> list[Event]:
        bus = EventBus(first_id=1)
        for n in range(CAPACITY):
            bus.publish(EventType.LOCAL_CHANGE, "s", n=n)
        got = await take(bus.subscribe(since=since), REPLAY + 1)
        bus.publish(EventType.SCAN_STARTED)  # then what comes, as it comes
        return got + await take(bus.subscribe(since=got[-1].id), 1)

    for since, reason in ((1, "too old"), (CAPACITY + 10, "unknown")):
        got = asyncio.run(scenario(since))
        assert got[0].type == EventType.MISSED and got[0].data["reason"] == reason
        assert [e.id for e in got[1:]] == [*range(CAPACITY - REPLAY + 1, CAPACITY + 2)]
