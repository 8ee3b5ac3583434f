"""The ``clocks`` family: every device has a wall clock of its own.

Devices disagree about the time (an RTC battery gone, a board that booted before NTP
answered, a person who set the date by hand), and NTP steps a wrong clock back or
forward, while the device runs or at its next boot. One shared seeded clock could not
show what that does: R36 (a device whose clock was behind deleted a file, and every
other device dropped the old bytes at its next prune) and R37 (one ahead, and ``prune
--all`` could not free them) went unseen. Here each node reads the shared seeded clock
plus an offset of its own; whatever backer stamps while it acts for a node (event and
version times, retention's notes, the times its person's edits and the kernel give
files and folders) follows that node's clock, and the harness's retention oracle judges
each device by what it could know: when it learned of a replacement, by its own clock.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from backer.model.records import Kind, Version
from backer.versioner.retention import DAY, HOUR, MINUTE

from .world import Clock, InvariantBroken

if TYPE_CHECKING:
    from .cluster import Cluster

# How far a device's wall clock may be off (ms): on time most often, else minutes to days
# either way (the seeded clock stays behind the real one: see machine.SEEDED_START_NS)
OFFSETS = [0, 0, 0, 0, -3 * DAY, -DAY, -HOUR, -2 * MINUTE, 2 * MINUTE, HOUR, DAY, 3 * DAY]
CORRECTED = 0  # a clock NTP set right
# A replacement learned this long after its author's time may still age from that time
# (the design: an online peer's change arrives within it, docs/decisions.md)
LATE_MS = MINUTE


class SkewedClock(Clock):
    """The seeded clock, read by each node with its own offset: time passes for all
    alike, but each reads its wall clock off by its own amount, which rules change
    (an NTP step, a reboot). The boot clock (``since_boot``) never moves with the wall
    clock and starts again at each boot, with a new boot id."""

    def __init__(self, seed: int, start_ns: int, nodes: int) -> None:
        super().__init__(seed, start_ns)
        draw = random.Random(f"clocks {seed}")  # (not the trace's own draws)
        self.offsets = {f"node{i}": draw.choice(OFFSETS) * 1_000_000 for i in range(nodes)}
        self.boots = dict.fromkeys(self.offsets, 0)
        self.booted = dict.fromkeys(self.offsets, start_ns)
        self.acting: list[str] = []  # the node whose code (or person) runs, innermost last

    @contextlib.contextmanager
    def node(self, name: str) -> Iterator[None]:
        self.acting.append(name)
        try:
            yield
        finally:
            self.acting.pop()

    def now_ns(self) -> int:
        return super().now_ns() + (self.offsets[self.acting[-1]] if self.acting else 0)

    def reading(self, name: str) -> int:
        """Node ``name``'s wall clock now (ms), for the harness's notes: the clock does not
        move for it, so the trace is the same with or without the harness looking."""
        return (self._now + self.offsets[name]) // 1_000_000

    def since_boot(self) -> tuple[str, int] | None:
        if not self.acting:
            return super().since_boot()
        name = self.acting[-1]
        return f"seeded {name} boot {self.boots[name]}", self._now - self.booted[name]

    def set(self, name: str, offset_ms: int) -> None:
        """Node ``name``'s wall clock is stepped to ``offset_ms`` off the seeded time."""
        self.offsets[name] = offset_ms * 1_000_000

    def reboot(self, name: str) -> None:
        """Node ``name`` boots again: a new boot id, its boot clock from zero."""
        self.boots[name] += 1
        self.booted[name] = self._now


@dataclass
class Learned:
    """When each running node first held each version, by its own clock (noted by the
    harness at the start of the step it appeared in, from the catalog's version ids, not
    from anything backer notes about them), when each version it held stopped being
    live there (a conflict copy stops when its original is replaced, before any version
    replacing the copy itself arrives), and the versions a ``prune --all`` dropped there
    (that one may drop what the window keeps)."""

    clock: SkewedClock
    at: dict[str, dict[str, int]] = field(default_factory=dict)  # node -> vid -> ms
    retired: dict[str, dict[str, int]] = field(default_factory=dict)  # node -> vid -> ms
    dropped_by_all: dict[str, set[str]] = field(default_factory=dict)
    started: dict[str, int] = field(default_factory=dict)  # each node's clock at step start

    def step_starts(self, names: list[str]) -> None:
        self.started = {name: self.clock.reading(name) for name in names}

    def note(self, name: str, held: set[str], live: set[str]) -> None:
        """Node ``name`` holds the versions ``held``, ``live`` of them current, after a
        step: those new to it were learned within the step, no earlier than its start,
        and so were those no longer live (one live again is current again). One it no
        longer holds (its ``.backer/`` came back from an old backup) is learned again
        when it returns."""
        known = self.at.setdefault(name, {})
        retired = self.retired.setdefault(name, {})
        for vid in set(known) - held:
            del known[vid]
            retired.pop(vid, None)
        stamp = self.started.get(name, self.clock.reading(name))
        for vid in held - set(known):
            known[vid] = stamp
        for vid in held - live - set(retired):
            retired[vid] = stamp
        for vid in live & set(retired):
            del retired[vid]


def learned_replacement(
    learned: dict[str, int],
    versions: dict[str, Version],
    late_ms: int,
    retired: dict[str, int] | None = None,
) -> dict[str, int]:
    """The earliest a node could know each version it holds stopped being current: when
    it learned of the first version it holds that supersedes it, or when the version
    stopped being live there (``retired``) if that was earlier (one neither: when it
    learned of the version itself), less ``late_ms``. No author's clock can move that
    earlier (R36: one behind made every device drop the replaced bytes at once), and no
    replacement that reached the node after a prune makes the prune a different one."""
    replaced: dict[str, int] = dict(retired or {})
    for vid, version in versions.items():
        for old in version.supersedes:
            if vid in learned:
                replaced[old] = min(replaced.get(old, learned[vid]), learned[vid])
    return {vid: replaced.get(vid, ms) - late_ms for vid, ms in learned.items()}


def check_own_times_ascend(cluster: Cluster) -> None:
    """A device never records an event as older than one it recorded before (its clock
    stepped back, across a reboot or not): in node 0's journal, each honest device's
    event times never go down, seq after seq."""
    journal = cluster.nodes[0].open().journal
    for node in cluster.nodes:
        last = None
        for event in journal.events(bytes(node.key.verify_key)):
            if last is not None and event.time_ms < last.time_ms:
                raise InvariantBroken(
                    f"{node.name} recorded event {event.seq} at {event.time_ms} ms, after "
                    f"event {last.seq} at {last.time_ms} ms (its clock stepped back)"
                )
            last = event


def check_all_pruned(cluster: Cluster, index: int) -> None:
    """After ``prune --all`` on node ``index``, its store holds only contents a file of
    the share holds (a live file version, or what the disk held at its last scan): every
    replaced or deleted content went, however recently it was replaced, by whichever
    clock (R37)."""
    share = cluster.nodes[index].share
    if share is None:
        return
    catalog = share.catalog
    wanted = {vid for (vid,) in catalog.conn.execute("SELECT vid FROM live")}
    wanted |= {entry.version_id for entry in catalog.local_entries().values()}
    needed = {
        version.content
        for vid in wanted
        if (version := catalog.version(vid)) is not None and version.kind == Kind.FILE
    }
    kept = [c for (c,) in catalog.conn.execute("SELECT content FROM store") if c not in needed]
    if kept:
        raise InvariantBroken(
            f"{cluster.nodes[index].name}'s prune --all kept {len(kept)} contents no file "
            f"holds, e.g. {kept[0].hex()[:16]}"
        )
