"""The resident node (``backer run``): one process serving every share of this device.

An I/O edge like :mod:`backer.connections.transport`; the engine underneath stays
sans-IO. Tasks and their owners (every task is cancelled by its owner on shutdown):

- ``Node.run`` owns one :class:`asyncio.TaskGroup`: one task per inbound connection
  (its header names the share, or the invite of a joiner) and one ``Runtime.run`` per
  share; and the :class:`~backer.discover.lan.LanDiscovery` (its socket and sender task),
  closed in its ``finally``;
- ``Runtime.run`` owns the share's TaskGroup: the watcher loop, the dial loop, the
  hourly prune of kept contents and one task per dial attempt, while
  ``control.serving`` answers the share's control channel.

Per share, one :class:`~backer.connections.transport.Hub` holds every session; exactly
one session per device (see :func:`keeps_new`), sessions stay open, and whatever a scan
records is pushed to every connected peer at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import logging
import os
import random
import socket
import sqlite3
import threading
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import nacl.signing

from backer.config import registry
from backer.config.identity import device_id, short_id
from backer.config.identity import home as device_home
from backer.connections import control, transport
from backer.connections.addresses import (
    advertised,
    format_address,
    loopback_only,
    parse_address,
)
from backer.connections.limits import Admission
from backer.discover import lan
from backer.errors import BackerError, reason
from backer.events import Event, EventBus, EventType, paths
from backer.model import entropy, revisions
from backer.model.materializer import Report
from backer.model.share import ScanSummary, Share, ShareBusy
from backer.node.commands import handler, note_seen, warn_disk_full
from backer.protocol.channel import (
    BUSY,
    HEADER_LEN,
    MODE_JOIN,
    MODE_SYNC,
    PEER_REFUSED,
    UNKNOWN,
    SecureChannel,
    refusal,
)
from backer.protocol.session import Session
from backer.scanner.ignore import IGNORE_FILE, IgnoreRules
from backer.scanner.watch import WRITTEN_MAX, WRITTEN_QUIET, Watcher
from backer.versioner.prune import (
    DROP_ALL,
    KeptBytes,
    PruneReport,
    Survey,
    prune_share,
    survey_apart,
)

if TYPE_CHECKING:
    from backer.config.registry import RegisteredShare

BACKOFF_BASE_S = 0.5  # the first retry after a failed dial (with jitter: 0.25-0.5 s)
BACKOFF_CAP_S = 60.0
DUPLICATE_WINDOW_S = 5.0  # two sessions with one device opened this close: simultaneous
STOP_GRACE_S = 2.0  # sessions get this long to say goodbye on shutdown
DISK_FULL_RETRY_S = 60.0  # after a full disk left files out, plan again this much later
PROGRESS_INTERVAL_S = 0.5  # transfer progress is published at most this often, and
# what this device needs is told to its peers at most this often
RATE_WINDOW = 4  # transfer rates are averaged over this many progress intervals
PRUNE_EVERY_S = 3600.0  # the retention policy is applied this often (and once watching)
PRUNE_TRIES = 5  # a prune whose survey the share's changes outdated reads again this often
PRUNE_RETRY_S = 5.0  # ... after this long
REGISTRY_CHECK_S = 1.0  # the share registry is re-read (when it changed) and the shares
# another backer process held are tried again this often
RESTART_BASE_S = 2.0  # a share whose runtime failed is restarted after this long, doubling
RESTART_CAP_S = 60.0  # up to this; a runtime that ran this long starts from the base again
ROOT_CHECK_S = 1.0  # how often the share's folder is checked to still be the share


RUN_LOCK = "run.lock"  # in the device home: held by the one ``backer run``, names its pid


def hold_home(home: Path) -> IO[bytes]:
    """Make this process the device's one node (held until the handle is closed). A
    second node would find every share busy, serve nothing, and take the first's web
    UI address (``backer open``) over: it must stop at once instead."""
    handle = open(home / RUN_LOCK, "a+b")  # noqa: SIM115 - held while the node runs
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read(20).decode(errors="replace").strip() or "?"
        handle.close()
        raise BackerError(f"backer run is already running for this device (pid {pid})") from None
    handle.truncate(0)
    handle.write(str(os.getpid()).encode())
    handle.flush()
    return handle


def _dialled_address(link: Link, device: bytes) -> str | None:
    """Where ``link``'s peer can be reached: the address we dialled; an inbound
    session's source port is not one (the address book then says where)."""
    return link.address if link.initiator == device else None


def _first_failure(exc: BaseException) -> BaseException:
    """The first error inside a runtime's TaskGroup's exception group."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def failure_reason(exc: BaseException) -> str:
    """One line for what made a share's runtime fail: its first error, by type and
    message."""
    exc = _first_failure(exc)
    text = reason(exc) if isinstance(exc, Exception) else str(exc)
    return f"{type(exc).__name__}: {text}"


def failure_place(exc: BaseException) -> str:
    """Where a runtime's failure was raised, as ``file:line in function``: the deepest
    frame of backer's own code (a RecursionError's last frames are the library's), so
    that a one-line reason with no file can be traced from the log."""
    frames = traceback.extract_tb(_first_failure(exc).__traceback__)
    own = [f for f in frames if f"{os.sep}backer{os.sep}" in f.filename] or frames
    if not own:
        return "an unknown place"
    frame = own[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}"


def unusable(share: Share) -> str | None:
    """Why a share whose runtime failed cannot be restarted yet: its database does
    not take a write (held by another process, a disk error). Probed on the open
    share, so that until it does the node still answers for the share."""
    conn = share.db.conn
    try:
        if conn.in_transaction:  # (what the failure left half-done is given up)
            conn.rollback()
        conn.execute("BEGIN IMMEDIATE")
        conn.rollback()
    except sqlite3.Error as exc:
        return failure_reason(exc)
    return None


def backoff(attempt: int, rng: random.Random, scale: float = 1.0) -> float:
    """Seconds to wait before dial attempt ``attempt`` + 1 after ``attempt`` failures in
    a row: doubling from BACKOFF_BASE_S up to BACKOFF_CAP_S, the upper half of that at
    random (peers that fail together do not retry in lockstep; never zero, so never a
    busy loop)."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(attempt, 32)) * scale
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


def keeps_new(
    old_initiator: bytes, new_initiator: bytes, old_age: float, window: float = DUPLICATE_WINDOW_S
) -> bool:
    """Of two sessions with the same device, whether the newer one replaces the older.

    Both devices decide alike: when both dialled at once (the older session is younger
    than ``window``), the session initiated by the smaller device key wins. Otherwise the
    newer one wins: the peer dials only when it has no session, so it lost the older."""
    if old_age > window or old_initiator == new_initiator:
        return True
    return new_initiator < old_initiator


@dataclass
class Link:
    """One authenticated connection with a device of a share."""

    peer: bytes
    initiator: bytes  # the device key of the side that dialled
    address: str | None  # where we dialled it; for an inbound one, where it came from
    hangup: transport.Hangup
    since: float = field(default_factory=time.monotonic)
    session: Session | None = None
    claimed: bool = False  # it was the device's session (its end is logged as such)
    moved: deque[tuple[float, int, int]] = field(default_factory=deque)  # the last
    # RATE_WINDOW measures: (seconds, chunk bytes received, sent)
    counted: tuple[int, int] = (0, 0)  # chunk bytes received and sent at the last measure
    need_published: tuple[int, int] | None = None  # the device's need last on the bus

    def measure(self, seconds: float) -> None:
        """Note what moved in the last ``seconds`` (called every PROGRESS_INTERVAL_S)."""
        if self.session is None or seconds <= 0:
            return
        stats = self.session.stats
        now = (stats.chunk_bytes_received, stats.chunk_bytes_sent)
        self.moved.append((seconds, now[0] - self.counted[0], now[1] - self.counted[1]))
        self.counted = now
        while len(self.moved) > RATE_WINDOW:
            self.moved.popleft()

    @property
    def rates(self) -> tuple[float, float]:
        """Chunk bytes/s received from the device and sent to it, over the last
        RATE_WINDOW measures: smooth, and 0 once nothing moved for that long."""
        seconds = sum(s for s, _, _ in self.moved)
        if not seconds:
            return 0.0, 0.0
        received = sum(r for _, r, _ in self.moved)
        return received / seconds, sum(s for _, _, s in self.moved) / seconds


@dataclass
class Target:
    """An address to dial, and what dialling it taught us."""

    address: str
    device: bytes | None = None  # the device that answered there last
    failures: int = 0  # failed attempts in a row
    due: float = 0.0  # monotonic time of the next attempt
    attempts: int = 0  # every attempt so far (a waiting ``sync`` counts on it)
    error: str | None = None  # why the last attempt failed
    dialling: bool = False


class Runtime:
    """One share served by the node: its hub, sessions, dialer, watcher and control."""

    def __init__(self, node: Node, share: Share, name: str) -> None:
        self.node = node
        self.share = share
        self.name = name
        self.log = node.log
        self.hub = transport.Hub(share, node.device_name, node.limits, scan_first=False)
        self.hub.applied = self._applied
        self.links: dict[bytes, Link] = {}
        self.targets: dict[str, Target] = {}
        self.hangups: set[transport.Hangup] = set()
        self.failed: dict[bytes, tuple[int, str]] = {}  # device -> (sessions that failed
        # in a row, the last one's reason)
        self.poke = asyncio.Event()
        self.conflicts_logged = 0
        self.disk_full_logged: str | None = None
        self.disk_full_said: str | None = None  # the logged line, with what frees room
        self.kept = KeptBytes()  # what 'backer prune --all' frees, for that line
        self.retrying_when_room = False
        self.tasks: asyncio.TaskGroup | None = None
        self.scanning = asyncio.Lock()  # one scan at a time (watcher, control)
        self.watching = asyncio.Event()  # the start-up scan is done, the watcher is on
        self.waiting: str | None = None  # why scans record nothing (logged once)
        self.paused = False  # no sessions, no dialling; local changes are still recorded
        self.gone: str | None = None  # why the share's folder is not the share now
        self.stopped: tuple[str, float] | None = None  # why the runtime failed, and the
        # monotonic time of its restart
        for address in transport.known_addresses(share):
            self.targets[address] = Target(address)
        self._read_address_book()
        self.hub.addresses.on_learned = self._learned

    @property
    def exchanging(self) -> bool:
        """Whether sessions are dialled and accepted: not while paused, while the
        folder is gone, while the runtime is stopped after a failure, or once the node
        is stopping (a hang-up wakes the dial loop, which would dial the device again)."""
        return not (self.paused or self.gone or self.stopped or self.node.stopping)

    # -- the share's tasks ----------------------------------------------------------------

    async def run(self, handle: control.Handler) -> None:
        """Serve the share until cancelled."""
        async with control.serving(self.share.root, handle), asyncio.TaskGroup() as tasks:
            self.tasks = tasks
            tasks.create_task(self._watch())
            tasks.create_task(self._dial_loop())
            tasks.create_task(self._publish_progress())
            tasks.create_task(self._prune_loop())
            tasks.create_task(self._guard_root())

    def publish(self, kind: EventType, **data: Any) -> Event:
        """An event of this share on the node's bus."""
        return self.node.bus.publish(kind, self.name, **data)

    async def scan(self, only: frozenset[str] | None = None) -> ScanSummary:
        """Scan the share (or the paths ``only``) now, off the event loop; push what it
        recorded to every connected peer at once, before its chunk index is written."""
        if not self.check_root():
            return ScanSummary(waiting=self.gone)
        async with self.scanning:
            self.publish(EventType.SCAN_STARTED, full=only is None)
            summary = await self.share.scan_off_loop(only, recorded=self.hub.journal_grew)
        self.hub.replicator.advance()  # the plan that waited for the scan's index
        self.hub.flush()  # and the chunk requests
        if summary.waiting != self.waiting and summary.waiting is not None:
            self.log.warning("%s: nothing recorded: %s", self.name, summary.waiting)
        self.waiting = summary.waiting
        if summary.events:
            changed = len(summary.added) + len(summary.modified) + len(summary.deleted)
            self.log.info(
                "%s: recorded %d changes (%d added, %d modified, %d deleted)",
                self.name,
                changed,
                len(summary.added),
                len(summary.modified),
                len(summary.deleted),
            )
            for change in ("added", "modified", "deleted"):
                if names := getattr(summary, change):
                    self.publish(EventType.LOCAL_CHANGE, change=change, **paths(names))
        self.publish(
            EventType.SCAN_FINISHED,
            full=only is None,
            changes=len(summary.added) + len(summary.modified) + len(summary.deleted),
            seconds=round(summary.seconds, 3),
        )
        self._log_problems()
        return summary

    async def _watch(self) -> None:
        """Scan what the watcher says changed, one batch at a time."""
        root = self.share.root
        scale = self.node.scale
        async with Watcher(
            root,
            IgnoreRules.load(root).excluded,
            written_quiet=WRITTEN_QUIET * scale,
            written_max=WRITTEN_MAX * scale,
        ) as watcher:
            store = self.hub.replicator.store
            store.on_stale = functools.partial(
                asyncio.get_running_loop().call_soon_threadsafe, watcher.changed
            )
            self.share.on_rescan_due = functools.partial(watcher.rescan, "own events back")
            async for changes in watcher.changes():
                if IGNORE_FILE in changes.paths:
                    watcher.is_ignored = IgnoreRules.load(root).excluded
                await self.scan(None if changes.full else changes.paths)
                if changes.reason == "start":
                    await self._finish_recorded()
                if changes.full:  # (after the start-up pass too: it reads every version)
                    self.share.release_memory()
                if changes.reason == "start":
                    self.log.info("%s: watching %s", self.name, root)
                    self.watching.set()

    async def _guard_root(self) -> None:
        """Check every ROOT_CHECK_S that the share's folder is still the share."""
        while True:
            await asyncio.sleep(ROOT_CHECK_S * self.node.scale)
            self.check_root()

    def check_root(self) -> bool:
        """Whether the share's folder is still the share (see Share.root_moved). When
        it stops being so: one error, every session closed, none dialled or accepted;
        when it is back: served again, and scanned in full."""
        moved = self.share.root_moved()
        if moved == self.gone:
            return moved is None
        self.gone = moved
        if moved is not None:
            self.log.error("%s: not served: %s", self.name, moved)
            self.publish(EventType.ERROR, path=None, reason=moved)
            self.hang_up("the share is not available on that device")
        else:
            self.log.info("%s: the share folder is back: served again", self.name)
            self.wake()
            if self.tasks is not None:
                self.tasks.create_task(self.scan())
        return moved is None

    async def _finish_recorded(self) -> None:
        """Write what this device recorded but a crash kept off the disk (a restore or a
        resolution killed midway), once the start-up scan has recorded what is there."""
        async with self.scanning:
            replicator = self.hub.replicator
            if replicator.operations is None and self.check_root():  # (else its plan does)
                excluded = IgnoreRules.load(self.share.root).excluded
                report = revisions.finish_recorded(self.share, excluded)
                if report.written or report.deleted or report.errors:
                    self.log.info(
                        "%s: finished an interrupted restore or resolution: %d written, "
                        "%d deleted, %d errors",
                        self.name,
                        len(report.written),
                        len(report.deleted),
                        len(report.errors),
                    )
                    self._log_problems()
            replicator.dirty = True  # what is not here is fetched once a peer caught us up
            replicator.advance()
            self.hub.flush()

    async def _prune_loop(self) -> None:
        """Apply the share's retention policy once the start-up scan is done and every
        PRUNE_EVERY_S. Not before: it reads every recorded version (seconds of CPU on a
        large share), which held the start-up scan back."""
        await self.watching.wait()
        while True:
            if self.check_root():
                await self.prune_apart()
                self.share.release_memory()  # (it read every recorded version)
            await asyncio.sleep(PRUNE_EVERY_S * self.node.scale)

    async def prune_apart(self) -> PruneReport | None:
        """:meth:`prune` with its survey of every recorded version (~30 CPU s at a million
        files: sessions' handshakes timed out behind it) in a worker thread. Its removals
        are made in the loop only if the catalog did not change while it read (else it
        reads again, PRUNE_TRIES times at most, then waits for the next round). The
        survey opens the database by its path: a share folder moved away meanwhile puts
        the prune off (the root guard reports the folder)."""
        loop = asyncio.get_running_loop()
        conn = self.share.db.conn
        for _ in range(PRUNE_TRIES):
            while conn.in_transaction:  # (a reader would see the state before it)
                await asyncio.sleep(PRUNE_RETRY_S * self.node.scale)
            before = conn.total_changes
            stop = threading.Event()
            try:
                surveyed = await loop.run_in_executor(None, survey_apart, self.share.root, stop)
            except asyncio.CancelledError:
                stop.set()
                raise
            except sqlite3.Error as exc:
                self.log.debug("%s: prune put off: %s", self.name, exc)
                return None
            if conn.total_changes == before and not conn.in_transaction and self.check_root():
                return self.prune(surveyed=surveyed)
            await asyncio.sleep(PRUNE_RETRY_S * self.node.scale)
        self.log.debug("%s: prune put off: the share kept changing while it read", self.name)
        return None

    def prune(
        self, dry_run: bool = False, everything: bool = False, surveyed: Survey | None = None
    ) -> PruneReport:
        """Drop the kept contents the retention policy no longer keeps, or with
        ``everything`` all of them (in the loop, so never in the middle of an apply or a
        scan's recording)."""
        policy = DROP_ALL if everything else None
        report = prune_share(self.share, entropy.now_ms(), dry_run, policy, surveyed)
        if report.announced:
            self.hub.journal_grew()
        if report.files and not dry_run:
            self.log.info(
                "%s: pruned the kept contents of %d versions (%d files, %d bytes freed)",
                self.name,
                report.versions,
                report.files,
                report.bytes,
            )
        return report

    def _log_problems(self) -> None:
        fresh, self.share.fresh_problems = self.share.fresh_problems, []
        for problem in dict.fromkeys(fresh):
            label = "warning" if problem.warning else "error"
            self.log.warning("%s: %s: %s: %s", self.name, label, problem.path, problem.reason)
            self.publish(
                EventType.ERROR, path=problem.path, reason=problem.reason, warning=problem.warning
            )

    def _applied(self, report: Report) -> None:
        """One log line per applied window of a plan (that did anything); a full disk
        warned of and a later plan scheduled, whatever the window held."""
        conflicts = self.hub.replicator.stats.conflicts_resolved - self.conflicts_logged
        self.conflicts_logged += conflicts
        if conflicts:
            self.publish(EventType.CONFLICT_APPEARED, count=conflicts)
        for change, names in (("written", report.written), ("deleted", report.deleted)):
            if names:
                self.publish(EventType.REMOTE_APPLIED, change=change, **paths(names))
        if report.written or report.deleted or report.kept_local_edits or report.errors:
            self.log.info(
                "%s: applied %d files (%d bytes), %d deleted, %d conflicts, %d local edits "
                "kept, %d errors",
                self.name,
                len(report.written),
                report.bytes_written,
                len(report.deleted),
                conflicts,
                len(report.kept_local_edits),
                len(report.errors),
            )
            self._log_problems()
        full = self.hub.replicator.disk_full  # (a window stopped by it may hold nothing)
        if full is None:
            self.disk_full_said = None
        elif str(full) != self.disk_full_logged and self.tasks is not None:
            self.disk_full_said = str(full)  # (what frees room is added once read)
            self.tasks.create_task(warn_disk_full(self, full))
        self.disk_full_logged = None if full is None else str(full)
        if full is not None and not self.retrying_when_room and self.tasks is not None:
            self.retrying_when_room = True
            self.tasks.create_task(self._retry_when_room())

    async def _retry_when_room(self) -> None:
        """Plan again a while after the disk was full: room may have been freed, and no
        new event would otherwise bring back the files left out."""
        await asyncio.sleep(DISK_FULL_RETRY_S * self.node.scale)
        self.retrying_when_room = False
        self.hub.replicator.dirty = True
        self.hub.replicator.advance()
        self.hub.flush()

    # -- sessions -----------------------------------------------------------------------

    async def connection(
        self,
        run: Callable[[Callable[[SecureChannel], None], transport.Hangup], Awaitable[Session]],
        address: str | None,
    ) -> None:
        """Run one connection (``run`` drives it, calling back once the peer is known);
        keep it as the device's session, or refuse it as a duplicate. Raises
        SessionClosed if it ended before it became the device's session."""
        hangup = transport.Hangup()
        self.hangups.add(hangup)
        link: Link | None = None

        def established(channel: SecureChannel) -> None:
            nonlocal link
            assert channel.peer is not None
            initiator = self.share.device if channel.initiator else channel.peer
            link = Link(channel.peer, initiator, address, hangup)
            self._claim(link)

        try:
            await run(established, hangup)
            self._lost(link, "the peer closed the session")
        except transport.SessionClosed as exc:
            lost = self._lost(link, str(exc), exc.failed)
            if PEER_REFUSED in str(exc) or (not lost and (link is None or not link.claimed)):
                raise  # (refused, or never the device's session: the caller says why)
        finally:
            self.hangups.discard(hangup)
            if link is not None and link.claimed:  # once its frames are gone (its channel's
                asyncio.get_running_loop().call_soon(self._release_memory)  # buffers)

    def _release_memory(self) -> None:
        """Hand back what an ended session held (events awaiting their run's end, up to
        the session's cap; its channel's buffers): glibc kept it, and a node that one
        member took to 350 MiB stayed at 110 MiB, its idle RSS 66 MiB."""
        if not self.node.stopping and self.node.runtimes.get(self.share.share_id) is self:
            self.share.release_memory()  # (not once its share closed)

    def _claim(self, link: Link) -> None:
        """Make ``link`` the session with its device, or refuse it (BackerError)."""
        if link.peer == self.share.device:
            raise BackerError("this is the device itself")
        old = self.links.get(link.peer)
        if old is not None:
            if not keeps_new(old.initiator, link.initiator, time.monotonic() - old.since):
                raise BackerError(
                    "a session with this device is already open (the one started by "
                    f"{short_id(old.initiator)} is kept)"
                )
            reason = (
                "replaced by a newer session with this device (the one started by "
                f"{short_id(link.initiator)} is kept)"
            )
            old.hangup(reason)
            self._lost(old, reason)
        link.claimed = True
        self.links[link.peer] = link
        note_seen(self.share, link.peer, _dialled_address(link, self.share.device))
        self.publish(
            EventType.DEVICE_CONNECTED,
            device=device_id(link.peer),
            name=self.share.members.names.get(link.peer, ""),
            address=link.address,
        )
        name = self.share.members.names.get(link.peer)
        named = f"{short_id(link.peer)} {name}" if name else short_id(link.peer)
        self.log.info(
            "%s: session with %s open (%s, %s)",  # (a joiner has no name yet)
            self.name,
            named,
            link.address or "?",
            "dialled" if link.initiator == self.share.device else "accepted",
        )

    def _lost(self, link: Link | None, reason: str, failed: bool = False) -> bool:
        """The session of ``link`` ended (logged); False if it never was the device's.
        One that ``failed`` counts as a failed attempt: its device is dialled again after
        a growing backoff, not at once (or the same error repeats every second)."""
        if link is None or self.links.get(link.peer) is not link:
            return False
        del self.links[link.peer]
        if failed:
            count = self.failed.get(link.peer, (0, ""))[0] + 1
            self.failed[link.peer] = (count, reason)
            due = time.monotonic() + backoff(count, self.node.rng, self.node.scale)
            for target in self.targets.values():
                if target.device == link.peer:
                    target.failures, target.due = count, max(target.due, due)
        else:
            self.failed.pop(link.peer, None)
        note_seen(self.share, link.peer, _dialled_address(link, self.share.device))
        self.log.info("%s: session with %s ended: %s", self.name, short_id(link.peer), reason)
        self.publish(
            EventType.DEVICE_DISCONNECTED,
            device=device_id(link.peer),
            name=self.share.members.names.get(link.peer, ""),
            reason=reason,
        )
        if not (self.node.stopping or failed or PEER_REFUSED in reason):  # (back off)
            self.wake(link.peer)
        self.poke.set()  # the dial loop slept without a deadline while the device was
        return True  # connected: it must see the device's targets due again

    def bind(self, session: Session) -> None:
        """The session of a link, once open (status reads it)."""
        link = self.links.get(session.peer or b"")
        if link is not None and link.session is None:
            link.session = session

    def hang_up(self, reason: str) -> None:
        for hangup in list(self.hangups):
            hangup(reason)

    def pause(self, paused: bool) -> None:
        """Stop (or resume) exchanging with the other devices: sessions closed, none
        dialled or accepted while paused; local changes are still recorded."""
        if paused == self.paused:
            return
        self.paused = paused
        if paused:
            self.hang_up("sharing is paused on that device")
        else:
            self.wake()
        self.publish(EventType.PAUSED if paused else EventType.RESUMED)

    async def _publish_progress(self) -> None:
        """Every PROGRESS_INTERVAL_S: transfer rates measured, what this device needs
        told to its peers (when it changed), and transfer progress on the bus while a
        plan runs (when it moved)."""
        last: tuple[int, int, int, int] | None = None
        measured = time.monotonic()
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            replicator = self.hub.replicator
            need = replicator.need()
            elapsed, measured = time.monotonic() - measured, time.monotonic()
            self._measure_links(elapsed, need)
            self.hub.flush()
            now = replicator.progress() if replicator.operations is not None else None
            if now is not None and now != last:
                done, total, got, wanted = now
                fetched = got - last[2] if last is not None and got >= last[2] else 0
                self.publish(
                    EventType.TRANSFER_PROGRESS,
                    files_done=done,
                    files_total=total,
                    bytes_done=got,
                    bytes_total=wanted,
                    rate=round(fetched / PROGRESS_INTERVAL_S),
                )
            last = now

    def _measure_links(self, elapsed: float, need: tuple[int, int]) -> None:
        """Each link's rates measured, and ``need`` told to its device. A function of its
        own: the loop's variable would otherwise stay in the sleeping coroutine's frame,
        and with it the last link's session long after it ended (a member's session
        that buffered 256 MiB of events held them until another device connected)."""
        for link in self.links.values():
            link.measure(elapsed)
            if link.session is not None:
                link.session.tell_need(*need)
                self._publish_need(link, link.session.peer_need)

    def _publish_need(self, link: Link, told: tuple[int, int] | None) -> None:
        """What a device says it still needs, on the bus when it changed: a page shows
        'needs N files' or 'in sync' as it happens, not at its next poll."""
        if told is None or told == link.need_published:
            return
        link.need_published = told
        self.publish(
            EventType.DEVICE_STATE,
            device=device_id(link.peer),
            need_files=told[0],
            need_bytes=told[1],
        )

    # -- dialling -----------------------------------------------------------------------

    def learn(self, device: bytes | None, addresses: list[str]) -> None:
        """Dial ``addresses`` (of ``device``, if known) from now on."""
        for address in addresses:
            target = self.targets.setdefault(address, Target(address))
            if device is not None:
                target.device = device
        self.poke.set()

    def _learned(self, device: bytes, host: str, port: int, source: str) -> None:
        """The address book learned an address of ``device`` (announced, heard on the
        LAN, or where it connected from): dial it from now on, and no longer the addresses
        the book dropped for it (so a member announcing without end adds no targets)."""
        if device not in self.share.members:
            return
        self.log.debug(
            "%s: %s may be reached at %s (%s)",
            self.name,
            short_id(device),
            format_address(host, port),
            source,
        )
        kept = {format_address(h, p) for h, p in self.hub.addresses.addresses(device)}
        for address, target in list(self.targets.items()):
            if target.device == device and address not in kept and not target.dialling:
                del self.targets[address]
        self.learn(device, [format_address(host, port)])

    def wake(self, device: bytes | None = None, address: str | None = None) -> None:
        """The peer is back (or should be): dial it again soon, whatever its backoff."""
        now = time.monotonic()
        for target in self.targets.values():
            if (
                (device is None and address is None)
                or target.device == device
                or (address is not None and target.address == address)
            ):
                target.failures = 0
                target.due = now + (0 if address else backoff(0, self.node.rng, self.node.scale))
        self.poke.set()

    def _wanted(self, target: Target, busy: set[bytes | None]) -> bool:
        """Whether ``target`` is to be dialled when due: not while another address of
        its device (or another address of unknown device) is being dialled, so that two
        sessions of ours never race to become the device's one."""
        device = target.device
        if target.dialling or device in busy:
            return False
        if not self.exchanging:
            return False
        if device is None:
            return True
        return (
            device != self.share.device
            and device in self.share.members
            and (device not in self.links)
        )

    def _read_address_book(self) -> None:
        """Dial every address the address book holds for a member (what it learns later
        comes through ``_learned``)."""
        for device in self.share.members.active:
            if device != self.share.device:
                found = self.hub.addresses.addresses(device)
                self.learn(device, [format_address(host, port) for host, port in found])

    async def _dial_loop(self) -> None:
        while True:
            now = time.monotonic()
            busy = {t.device for t in self.targets.values() if t.dialling}
            due = [t for t in self.targets.values() if self._wanted(t, busy)]
            for target in due:
                if target.due <= now and target.device not in busy:
                    busy.add(target.device)
                    target.dialling = True
                    assert self.tasks is not None
                    self.tasks.create_task(self._dial(target))
            later = [t.due - now for t in due if t.due > now]
            self.poke.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.poke.wait(), min(later, default=None))

    async def _dial(self, target: Target) -> None:
        target.attempts += 1
        self.log.debug("%s: dialling %s", self.name, target.address)
        opened = False

        def established(channel: SecureChannel) -> None:
            nonlocal opened
            target.device = channel.peer
            opened = True

        async def run(claim: Callable[[SecureChannel], None], hangup: transport.Hangup) -> Session:
            def both(channel: SecureChannel) -> None:
                established(channel)
                claim(channel)

            host, port = parse_address(target.address)
            return await transport.dial(
                self.hub,
                lambda: transport.tcp_streams(host, port),
                False,
                progress=self.bind,
                established=both,
                hangup=hangup,
            )

        try:
            await self.connection(run, target.address)
            target.error = None
        except (transport.SessionClosed, BackerError) as exc:
            target.error = str(exc)
            if PEER_REFUSED in str(exc):  # our handshake ended, but the peer then refused
                opened = False  # us (e.g. removed): a failure, backed off like the others
            if not opened:
                target.failures += 1
                delay = backoff(target.failures, self.node.rng, self.node.scale)
                target.due = time.monotonic() + delay
                self.log.info(
                    "%s: cannot connect to %s: %s (attempt %d failed; next in %.1f s)",
                    self.name,
                    target.address,
                    exc,
                    target.failures,
                    delay,
                )
        finally:
            if opened:  # it answered: remembered, and dialled again soon if it went away
                transport.remember_address(self.share, target.address)
                target.failures = self.failed.get(target.device or b"", (0, ""))[0]
                if target.due <= time.monotonic():
                    target.due = time.monotonic() + backoff(0, self.node.rng, self.node.scale)
            target.dialling = False
            self.poke.set()

    async def accept(
        self,
        streams: transport.Streams,
        channel: SecureChannel,
        address: str,
        admitted: Callable[[], None],
    ) -> None:
        """Serve an inbound connection whose header named this share (or its invite)."""

        async def run(claim: Callable[[SecureChannel], None], hangup: transport.Hangup) -> Session:
            def both() -> None:
                admitted()
                claim(channel)

            return await self.hub.run(
                streams, channel, self.hub.accept, False, self.bind, both, hangup
            )

        try:
            await self.connection(run, address)
        except transport.SessionClosed as exc:
            self.node.refused(str(exc), f"{self.name}: closed session with {address}: ")

    def close(self) -> None:
        """Give up what is unfinished (no temp file stays) and close the share (even
        when giving up fails: its lock must go, or the share could not be opened again)."""
        try:
            self.hub.replicator.abandon()
        finally:
            self.share.close()


class Node:
    """The resident process: every share of this device, one listener, dialers."""

    def __init__(
        self,
        shares: list[RegisteredShare] | None,
        key: nacl.signing.SigningKey,
        *,
        listen: tuple[str, int],
        log: logging.Logger,
        limits: transport.Limits | None = None,
        home: Path | None = None,
    ) -> None:
        """``shares``: those to serve; None: every share registered in ``home`` (the
        device's directory, default: ``BACKER_HOME`` or the platform's), followed as
        'init', 'join' and 'forget' change the registry while the node runs."""
        self.home = home or device_home()
        self.registry = shares is None  # follow the registry
        self.entries = registry.registered(self.home) if shares is None else shares
        self.key = key
        self.listen = listen
        self.log = log
        self.limits = limits or transport.Limits.from_env()
        self.scale = transport.time_scale()
        self.rng = random.Random()
        self.device_name = socket.gethostname()
        self.runtimes: dict[bytes, Runtime] = {}
        self.addresses: tuple[str, ...] = ()  # where peers can reach this node
        self.admission = Admission()
        self.refused = transport.RateLimitedLog(lambda line: log.warning("%s", line))
        self.started = asyncio.Event()
        self.bus = EventBus()
        self._tasks: asyncio.TaskGroup | None = None
        self.serving: dict[bytes, asyncio.Task[None]] = {}  # share id -> its _serve
        self.stopping = False
        self.discovery: lan.LanDiscovery | None = None

    # -- what other parts of backer call -------------------------------------------------

    def learn(self, share_id: bytes, device: bytes | None, addresses: list[str]) -> None:
        """Addresses where ``device`` (a member of the share) may be reached: dialled
        from now on (the address book and LAN discovery feed this)."""
        runtime = self.runtimes.get(share_id)
        if runtime is not None:
            runtime.learn(device, addresses)

    def wake(self, device: bytes) -> None:
        """``device`` is back (seen on the network): dial it now, whatever its backoff."""
        for runtime in self.runtimes.values():
            runtime.wake(device)

    def events(self, since: int | None = None) -> AsyncIterator[Event]:
        """What happens in this node, as it happens (see :mod:`backer.events`): every
        event after id ``since`` still buffered, then each new one, until the node stops."""
        return self.bus.subscribe(since)

    def ask(self, share_id: bytes, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Answer a control request in process, as the control channel would."""
        return handler(self, self.runtimes[share_id])(request)

    # -- running ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then close every session with a reason, remove
        the temp files of unfinished transfers and close the shares."""
        busy = self._open()
        loop = asyncio.get_running_loop()  # asyncio's own reports (accept out of
        # descriptors...): rate-limited lines, not tracebacks
        loop.set_exception_handler(lambda _, context: self.refused(str(context.get("message"))))
        try:
            server = await self._listen()
            self.discovery = await self._discover(server)
            try:
                async with asyncio.TaskGroup() as tasks:
                    self._tasks = tasks
                    for runtime in list(self.runtimes.values()):
                        self._start_serving(runtime)
                    if busy or self.registry:
                        tasks.create_task(self._follow_registry(busy))
                    self.started.set()
                    await stop.wait()
                    self.stopping = True
                    self.bus.close()
                    server.close()
                    self.log.info("stopping")
                    for runtime in self.runtimes.values():
                        runtime.hang_up("the device is shutting down")
                    await self._drain()
                    raise _Stopped
            except* _Stopped:
                pass
        finally:
            if self.discovery is not None:
                await self.discovery.__aexit__(None, None, None)
                self.discovery = None
            for runtime in self.runtimes.values():
                with contextlib.suppress(OSError, sqlite3.Error):  # (close every other)
                    runtime.close()
            self.log.info("stopped")

    async def _discover(self, server: asyncio.Server) -> lan.LanDiscovery | None:
        """LAN discovery (see backer.discover.lan), unless the node listens on loopback
        alone, where no other machine could dial it; without it if its port is taken."""
        host, _ = self.listen
        if host not in ("", "0.0.0.0", "::") and loopback_only([format_address(host, 1)]):
            return None
        port = server.sockets[0].getsockname()[1]

        def shares() -> list[lan.LanShare]:
            served = [r.share for r in self.runtimes.values() if r.share.share_key]
            return [lan.LanShare(s.share_id, tuple(s.share_keys), s.device, port) for s in served]

        discovery = lan.LanDiscovery(
            lan.PORT, shares, self._found, interval=lan.INTERVAL_S * self.scale
        )
        try:
            return await discovery.__aenter__()
        except BackerError as exc:
            self.log.warning("%s: devices on the LAN are not looked for", exc)
            return None

    def _found(self, share_id: bytes, device: bytes, addresses: list[tuple[str, int]]) -> None:
        """A member heard on the LAN: into the address book, and dialled now, whatever
        its backoff (it is back)."""
        runtime = self.runtimes.get(share_id)
        if runtime is None or device not in runtime.share.members:
            return
        for host, port in addresses:
            self.log.debug("%s: %s heard on the LAN at %s", runtime.name, short_id(device), host)
            runtime.hub.addresses.learn(device, host, port, "lan")
            runtime.wake(device, format_address(host, port))

    async def _serve(self, runtime: Runtime) -> None:
        """Serve one share; when its runtime fails, stop it (with the reason, in the log
        and in ``status``) and restart it after a backoff doubling from RESTART_BASE_S
        to RESTART_CAP_S: one failure must not leave the share unserved until the
        process restarts. While the folder is gone (see Runtime.check_root) the restart
        waits until it is back."""
        failures = 0
        current: Runtime | None = runtime
        while current is not None:
            started = time.monotonic()
            try:
                await current.run(handler(self, current))
                return
            except Exception as exc:
                why = failure_reason(exc)
                self.log.debug("%s: it failed in %s", current.name, failure_place(exc))
            failures = 1 if time.monotonic() - started > RESTART_CAP_S else failures + 1
            current = await self._restart(current, why, failures)

    async def _restart(self, runtime: Runtime, why: str, failures: int) -> Runtime | None:
        """Stop a runtime that failed; once its backoff passed and the share looks
        usable again (see :func:`unusable`; if not, back off further), open the share
        again as a new runtime (a fresh database connection and state: the failure may
        have left the old ones half-changed). None once the share is not registered.
        Until then the share's control channel answers (``status`` says why it stopped
        and when it retries; other requests get that as their error)."""
        async with contextlib.AsyncExitStack() as answering:
            with contextlib.suppress(OSError):  # (not while its folder is gone)
                serving = control.serving(runtime.share.root, handler(self, runtime))
                await answering.enter_async_context(serving)
            runtime.hang_up("the share is restarting on that device")
            while True:
                delay = min(RESTART_CAP_S, RESTART_BASE_S * 2 ** (failures - 1)) * self.scale
                runtime.stopped = (why, time.monotonic() + delay)
                self.log.error("%s: stopped: %s; retry in %.0f s", runtime.name, why, delay)
                runtime.publish(EventType.ERROR, path=None, reason=f"stopped: {why}")
                await asyncio.sleep(delay)
                while (moved := runtime.share.root_moved()) is not None:  # (no use before
                    runtime.gone = moved  # it is back: status says why meanwhile)
                    await asyncio.sleep(ROOT_CHECK_S * self.scale)
                if self.registry and not self._registered(runtime.share.share_id):
                    return None
                unready = unusable(runtime.share)
                if unready is None:
                    break
                why, failures = unready, failures + 1
        del self.runtimes[runtime.share.share_id]
        with contextlib.suppress(OSError, sqlite3.Error):  # (what failed may fail again)
            runtime.close()
        while True:
            try:
                share = Share.open(runtime.share.root, self.key, True, self.home)
                break
            except (BackerError, OSError, sqlite3.Error) as exc:  # (another process took
                self.log.error("%s: not served: %s; retry in %.0f s", runtime.name, exc, delay)
                await asyncio.sleep(delay)  # it meanwhile: it answers for it now)
            if self.registry and not self._registered(runtime.share.share_id):
                return None
        restarted = self._add(share, runtime.name)
        if restarted is not None:
            self._announce(restarted)
            self.log.info("%s: restarted", runtime.name)
        return restarted

    def _open(self) -> list[RegisteredShare]:
        """Open every registered share; return those another backer process holds now
        (a one-shot sync or scan): :meth:`_follow_registry` serves them once it lets go."""
        busy = []
        for entry in self.entries:
            try:
                share = Share.open(Path(entry.root), self.key, True, self.home)
            except ShareBusy as exc:
                self.log.warning("%s: served once it is free: %s", entry.name, exc)
                busy.append(entry)
                continue
            except BackerError as exc:
                self.log.error("%s: not served: %s", entry.name, exc)
                continue
            self._add(share, entry.name)
        if not self.runtimes and not busy:
            self.log.warning("no share to serve: 'backer init' or 'backer join' makes one")
        return busy

    def _add(self, share: Share, name: str) -> Runtime | None:
        """A runtime for an opened share (None, and the share closed, if it is served
        already under another name)."""
        if share.share_id in self.runtimes:
            share.close()
            return None
        if share.checked:
            self.log.info("%s: share database checked: it was not closed cleanly", name)
        control.announce_starting(share.root)
        runtime = self.runtimes[share.share_id] = Runtime(self, share, name)
        return runtime

    async def _follow_registry(self, busy: list[RegisteredShare]) -> None:
        """Every REGISTRY_CHECK_S: serve the shares another process held at start once
        it lets go (a node started while a 'backer sync' ran served the other shares
        only, until it was restarted); and, following the registry, serve a share that
        'init' or 'join' registered, and stop serving one that 'forget' removed (both
        took effect only at the next start)."""
        stamp = self._registry_stamp()
        while True:
            await asyncio.sleep(REGISTRY_CHECK_S * self.scale)
            if self.registry and stamp != (stamp := self._registry_stamp()):
                busy = await self._reread_registry(busy)
            for entry in list(busy):
                try:
                    share = Share.open(Path(entry.root), self.key, True, self.home)
                except ShareBusy:
                    continue
                except BackerError as exc:
                    self.log.error("%s: not served: %s", entry.name, exc)
                    busy.remove(entry)
                    continue
                busy.remove(entry)
                self._serve_opened(share, entry.name, "free now: served")

    def _registry_stamp(self) -> tuple[int, int, int] | None:
        """What changes whenever the registry is written (it is replaced by a rename)."""
        try:
            info = os.stat(self.home / registry.REGISTRY_FILE)
        except OSError:
            return None
        return info.st_ino, info.st_mtime_ns, info.st_size

    def _registered(self, share_id: bytes) -> bool:
        """Whether the share is still registered (a damaged registry: assume so)."""
        try:
            return any(e.share_id == share_id for e in registry.registered(self.home))
        except BackerError:
            return True

    async def _reread_registry(self, busy: list[RegisteredShare]) -> list[RegisteredShare]:
        """Stop serving the shares no longer registered (or registered at another
        folder), serve those newly registered; the shares still busy."""
        try:
            entries = registry.registered(self.home)
        except BackerError as exc:
            self.log.error("%s: the shares served stay as they are", exc)
            return busy
        wanted = {entry.share_id: entry for entry in entries}
        for share_id, runtime in list(self.runtimes.items()):
            entry = wanted.get(share_id)
            if entry is None or entry.root != runtime.share.root:
                await self._retire(runtime)
        busy = [e for e in busy if wanted.get(e.share_id) == e]
        known = {*self.runtimes, *(e.share_id for e in busy)}
        for entry in entries:
            if entry.share_id in known:
                continue
            try:
                share = Share.open(Path(entry.root), self.key, True, self.home)
            except ShareBusy:  # ('init' and 'join' hold it while they scan)
                busy.append(entry)
                continue
            except BackerError as exc:
                self.log.error("%s: not served: %s", entry.name, exc)
                continue
            self._serve_opened(share, entry.name, "registered: served")
        return busy

    def _serve_opened(self, share: Share, name: str, said: str) -> None:
        """Serve a share opened while the node runs."""
        runtime = self._add(share, name)
        if runtime is not None:
            self._announce(runtime)
            self.log.info("%s: %s", name, said)
            self._start_serving(runtime)

    def _start_serving(self, runtime: Runtime) -> None:
        assert self._tasks is not None
        share_id = runtime.share.share_id
        task = self.serving[share_id] = self._tasks.create_task(self._serve(runtime))

        def done(_: asyncio.Task[None]) -> None:
            if self.serving.get(share_id) is task:
                del self.serving[share_id]

        task.add_done_callback(done)

    async def _retire(self, runtime: Runtime) -> None:
        """Stop serving a share that was forgotten: sessions closed with a reason, its
        tasks cancelled, the share closed."""
        share_id = runtime.share.share_id
        self.log.info("%s: no longer registered: not served", runtime.name)
        runtime.hang_up("the share is no longer served on that device")
        task = self.serving.get(share_id)
        if task is not None:
            task.cancel()
            await asyncio.wait([task])  # (a cancellation of this task itself still ends it)
        runtime = self.runtimes.pop(share_id, runtime)
        with contextlib.suppress(OSError, sqlite3.Error):
            runtime.close()

    async def _listen(self) -> asyncio.Server:
        host, port = self.listen
        try:
            server = await transport.tcp_server(self._on_connect, host, port)
        except OSError as exc:
            # (asyncio's strerror repeats the address: the errno's own text says it once)
            why = os.strerror(exc.errno) if exc.errno else reason(exc)
            if exc.errno == errno.EADDRINUSE:
                why += (
                    " (another 'backer run' or program holds it: --listen HOST:PORT picks another)"
                )
            raise BackerError(f"cannot listen on {host}:{port}: {why}") from exc
        bound = [s.getsockname()[:2] for s in server.sockets]
        self.addresses = tuple(dict.fromkeys(a for h, p in bound for a in advertised(h, p)))
        for runtime in self.runtimes.values():
            self._announce(runtime)
        self.log.info("listening on %s", ", ".join(f"{h}:{p}" for h, p in bound))
        return server

    def _announce(self, runtime: Runtime) -> None:
        """Tell the other members where this node listens for ``runtime``'s share: in
        the announcement its sessions gossip, and on the LAN at once, in its first
        rounds (a share served after start was heard there only at the next round, up
        to half a minute later)."""
        runtime.hub.addresses.announce(parse_address(a) for a in self.addresses)
        if self.discovery is not None:
            self.discovery.wake()

    async def _drain(self) -> None:
        """Give the sessions a moment to send their goodbyes."""
        deadline = time.monotonic() + STOP_GRACE_S * min(self.scale, 1.0)
        while time.monotonic() < deadline and any(r.hangups for r in self.runtimes.values()):
            await asyncio.sleep(0.02)

    def _on_connect(self, reader: transport.Received, writer: asyncio.StreamWriter) -> None:
        if self.stopping or self._tasks is None:
            writer.transport.abort()
            return
        self._tasks.create_task(self._accept(reader, writer))

    def _route(self, header: bytes) -> Runtime | None:
        mode, ident = header[:1], header[1:HEADER_LEN]
        if mode == MODE_SYNC:
            runtime = self.runtimes.get(ident)
            return runtime if runtime is not None and runtime.exchanging else None
        if mode == MODE_JOIN:
            for runtime in self.runtimes.values():
                if runtime.exchanging and runtime.share.invite_key(ident):
                    return runtime
        return None

    async def _accept(self, reader: transport.Received, writer: asyncio.StreamWriter) -> None:
        """An inbound connection: admitted among those still in their handshake, routed
        by its clear header to the share it names."""
        peer = writer.get_extra_info("peername")
        host = str(peer[0] if isinstance(peer, tuple) else peer)
        address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else host
        evicted = False

        def evict() -> None:
            nonlocal evicted
            evicted = True
            writer.write(refusal(BUSY))
            writer.transport.abort()

        ticket = self.admission.enter(host, evict)
        try:
            header = await asyncio.wait_for(reader.readexactly(HEADER_LEN), self.limits.handshake_s)
            runtime = self._route(header)
            if runtime is None:
                writer.write(refusal(UNKNOWN))
                self.refused("unknown share or invite", f"closed session with {host}: ")
                return
            channel = transport.responder(runtime.share, runtime.share.key)
            channel.receive_data(header)
            streams = transport.Streams(reader, writer, writer.close)
            await runtime.accept(streams, channel, address, lambda: self.admission.leave(ticket))
        except (asyncio.IncompleteReadError, TimeoutError, OSError) as exc:
            reason = (
                "closed to make room for newer handshakes"
                if evicted
                else (f"no header: {type(exc).__name__}")
            )
            self.refused(reason, f"closed session with {host}: ")
        finally:
            self.admission.leave(ticket)
            writer.close()


class _Stopped(Exception):
    """Raised inside the node's TaskGroup to cancel every task it owns."""
