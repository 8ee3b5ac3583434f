"""Tell a running node which paths of a share may have changed, as soon as they do.

:class:`Watcher` runs watchdog's inotify observer over the share (its threads owned by
the ``async with``) and yields :class:`Changes`: first a full scan ("start"), then
batches of share-relative paths, each to be scanned with its subtree (a directory
event names the directory; nothing below a path named in the same batch is named). A
full scan is asked for again every ``rescan_every`` seconds (the safety net for what no
event reports: a write through ``mmap``) and whenever the kernel's event queue
overflowed (events were lost).

- Events: only those that can change a name or content (created, deleted, moved,
  closed after writing, attributes), not every ``write()`` (IN_MODIFY) nor opens and
  reads: watchdog's default set is what overflows inotify's queue on large trees.
- Written, not closed (Linux): a file written and kept open (a log, a database) or cut
  by ``truncate(2)`` raises IN_MODIFY alone. A second inotify instance listens to
  IN_MODIFY and IN_CLOSE_WRITE only, on the same folders, and is read at most every
  ``WRITTEN_GATHER`` seconds, so that the kernel folds a file's successive writes into
  one queued event and a large write wakes no thread per ``write()``. A file written
  and not closed by then is reported once no write came for ``written_quiet``
  seconds, or ``written_max`` seconds after its first one while the writes go on; its
  close reports it at once (the main instance) and drops the wait. Watches of the main
  instance come first: at the watch limit this one gives its own back.
- Coalescing: a batch is handed over once no event came for ``quiet`` seconds, or
  ``max_delay`` seconds after its first event, whichever is sooner; while the node
  scans, new events gather into the next batch.
- Dropped: ``.backer/`` (never watched), backer's own temp files, ignored paths
  (``is_ignored(path, is_dir)``, asked about the path itself: give it
  ``IgnoreRules.excluded``, which also answers for ignored parents). A batch naming
  ``.backerignore`` means new rules: set ``watcher.is_ignored`` to the reloaded ones
  (``Share.scan`` makes that batch a whole scan by itself).
- Watch limit: a directory that cannot be watched (``fs.inotify.max_user_watches``
  reached) is logged once as a warning and polled, with everything below it, every
  ``poll_every`` seconds by one thread comparing lstat snapshots; the rest stays on
  inotify. Without inotify at all (instance limit, another OS's observer failing),
  the whole share is polled.
- Out of file descriptors: a new directory whose listing fails with EMFILE or ENFILE
  (while a burst of new folders meets the process's descriptor limit) has neither
  its subdirectories watched nor its entries reported; the watcher walks it again
  itself, 1 s later, doubling to 30 s while it still fails, and then reports it whole
  (no further event need come for what it held to be scanned).

Measured here (2 shared cores, 100,000 files in 1,101 directories, warm page cache,
after a clean stop): watching 0.24-0.35 s after ``__aenter__`` begins (one watch per
directory, added in a worker thread); the "start" scan of that unchanged tree then
takes about 4 s, off the loop (:meth:`Share.scan_off_loop`); idle, the watcher used
0.00 s of CPU over 20 s (38 MiB RSS for the whole process); one saved file is reported
~50 ms after its close, a burst of 1,000 creates 0.04-0.07 s after the last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import select
import stat
import struct
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver

from backer.fs.paths import METADATA_DIR
from backer.scanner.ignore import is_temp_name
from backer.scanner.walk import entry_key, outermost, stat_key_of, under_any

log = logging.getLogger("backer.watch")

# A directory made with subdirectories (``mkdir -p``, a copied tree) is walked for its
# own event, then again for each of theirs: adding the watch again is harmless, but
# watchdog warns each time (a RuntimeWarning per directory, hundreds in a busy log).
warnings.filterwarnings(
    "ignore", "Callback with id .* already exists", RuntimeWarning, r"backer\.scanner\.watch"
)

EVENTS = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    FileMovedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileAttribEvent,
    DirAttribEvent,
]
WRITTEN_QUIET = 10.0  # seconds without a write before a file written and not closed is
WRITTEN_MAX = 60.0  # reported; at most this long after its first write (Syncthing: 10, 60)
WRITTEN_GATHER = 0.5  # seconds the written-file instance lets its events gather: the
# kernel merges an event with the one queued just before it, so a file's writes in that
# time are one event (16,384 queued at most: 32,000 distinct files a second)
WATCHES_SYSCTL = "/proc/sys/fs/inotify/max_user_watches"
POLL_EVERY = 10.0  # seconds between two looks at the directories inotify cannot watch
SHORT_RETRY = (1.0, 30.0)  # seconds before walking again a directory that could not be
# listed for want of file descriptors: the first wait, then doubled up to the second
SHORT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)
ALIVE_EVERY = 5.0  # seconds between two checks that the watcher's threads still run: an
# exception in watchdog's thread ends it, and no change was seen again until the hourly scan
LIMIT_HINT = (
    "inotify watch limit reached (fs.inotify.max_user_watches = {limit}): {path} and "
    "whatever else cannot be watched is polled every {every:g} s instead, so changes "
    "there show up later; raise the limit, e.g. "
    "'sysctl fs.inotify.max_user_watches=1048576'"
)
INSTANCES_HINT = (
    "cannot use inotify ({reason}; see fs.inotify.max_user_instances): the whole share "
    "is polled every {every:g} s instead"
)

GONE = (
    "the share's folder {root} was deleted: it is no longer watched (only the periodic "
    "full scan looks at it); restart backer once it is back"
)


class WatcherStopped(Exception):
    """A thread of the watcher ended while it ran: changes are no longer seen (the node
    restarts the share, whose start-up scan finds what was missed)."""


@dataclass(frozen=True)
class Changes:
    """Paths (share-relative) that may have changed; ``full``: scan everything (the
    paths are then only what events named meanwhile: ``.backerignore`` among them means
    new rules)."""

    paths: frozenset[str]
    full: bool
    reason: str  # start, periodic, overflow, events, gone, or a caller's (see rescan)


class Watcher:
    """Watches one share; ``async with`` starts and stops its threads."""

    def __init__(
        self,
        root: Path,
        is_ignored: Callable[[str, bool], bool],
        *,
        quiet: float = 0.05,
        max_delay: float = 1.0,
        rescan_every: float = 3600.0,
        poll_every: float = POLL_EVERY,
        written_quiet: float = WRITTEN_QUIET,
        written_max: float = WRITTEN_MAX,
    ) -> None:
        self.root = root
        self.is_ignored = is_ignored
        self.quiet, self.max_delay = quiet, max_delay
        self.rescan_every, self.poll_every = rescan_every, poll_every
        self.written_quiet, self.written_max = written_quiet, written_max
        self._prefix = os.fspath(root) + os.sep
        self._inbox: list[tuple[str, bool]] = []  # from watchdog's threads, under the lock
        self._inbox_lock = threading.Lock()
        self._pending: set[str] = set()
        self._written: dict[str, tuple[float, float]] = {}  # path: its first, last write
        self._stale_at: dict[str, float] = {}  # path: when ``changed`` last reported it
        self.writes: _Writes | None = None  # the written-file instance (Linux)
        self._full: str | None = None
        self._last = 0.0
        self._arrived = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observer: BaseObserver | None = None
        self._poller: _Poller | None = None
        self.polled: set[str] = set()  # subtrees polled instead of watched ('' the share)
        self._warned = False
        self._root_id: tuple[int, int] | None = None  # (inode, device) of the folder watched
        self._unlisted: dict[bytes, Callable[[bytes], bool]] = {}  # directories to walk
        # again (no descriptors then), with what walks one and says if it could be listed
        self._short = asyncio.Event()  # some are
        self._retrying: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Watcher:
        self._loop = asyncio.get_running_loop()
        info = os.lstat(self.root)
        self._root_id = (info.st_ino, info.st_dev)
        try:
            self._observer = await asyncio.to_thread(self._start_observer)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENOSPC, errno.ENOMEM, errno.ENOSYS):
                raise
            reason = exc.strerror or str(exc)
            if exc.errno == errno.ENOSPC:
                self._warn_limit(self._prefix.rstrip(os.sep))
            else:
                log.warning(INSTANCES_HINT.format(reason=reason, every=self.poll_every))
            self._warned = True
            self._poll("")
        if self._poller is not None:  # watching means: every change from now on is seen
            await asyncio.to_thread(self._poller.caught_up)
        self._retrying = asyncio.create_task(self._walk_again())
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        observer, poller, retrying = self._observer, self._poller, self._retrying
        writes, self.writes = self.writes, None
        self._observer = self._poller = self._retrying = None
        if retrying is not None:
            retrying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retrying
        if observer is not None:
            observer.stop()
            await asyncio.to_thread(observer.join)
        if poller is not None:
            poller.close()
            await asyncio.to_thread(poller.join)
        if writes is not None:
            writes.close()
            await asyncio.to_thread(writes.join)

    def _start_observer(self) -> BaseObserver:
        """Watch the share (in a worker thread: adding the watches walks every
        directory); watchdog's inotify observer with backer's hooks on Linux."""
        handler = _Handler(self)
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError):  # (no instance left: closes only)
                self.writes = _Writes(self)
            observer: BaseObserver = _InotifyObserver(self)
        else:
            from watchdog.observers import Observer

            observer = Observer()
        observer.schedule(handler, os.fspath(self.root), recursive=True, event_filter=EVENTS)
        try:
            observer.start()
            if self.writes is not None:
                self.writes.start()
        except BaseException:
            observer.stop()
            if self.writes is not None:
                self.writes.close()
                self.writes = None
            raise
        return observer

    # -- what the consumer sees ------------------------------------------------------

    async def changes(self) -> AsyncIterator[Changes]:
        """Batches of changes, forever: first a full scan ("start")."""
        loop = asyncio.get_running_loop()
        next_full = loop.time() + self.rescan_every
        self._pending.clear()
        yield Changes(frozenset(), True, "start")
        while True:
            due = min(next_full, loop.time() + ALIVE_EVERY, *self._written_due().values())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(due):
                    await self._arrived.wait()
            if (ended := self.ended()) is not None:
                raise WatcherStopped(f"the watcher's thread {ended} ended: changes went unseen")
            if self._arrived.is_set():
                await self._settle(loop)
            self._arrived.clear()
            if loop.time() >= next_full:
                self._full = self._full or "periodic"
            for path, at in self._written_due().items():
                if at <= loop.time():
                    self._pending.add(path)
                    del self._written[path]
            paths = frozenset(outermost(self._pending))
            self._pending.clear()
            if self._full is not None:
                reason, self._full = self._full, None
                next_full = loop.time() + self.rescan_every
                self._written.clear()  # (what a scan from now on sees)
                yield Changes(paths, True, reason)
            elif paths:
                yield Changes(paths, False, "events")

    def ended(self) -> str | None:
        """The name of a thread of the watcher that is no longer running, if one is
        (after the share's folder went, watchdog's ends by design)."""
        threads: list[object] = []
        if self._observer is not None and not self._root_went():
            observer = self._observer
            threads += [observer, *observer.emitters, getattr(observer, "_inotify_fd", None)]
        threads += [self._poller, self.writes]
        for thread in threads:
            if isinstance(thread, threading.Thread) and not thread.is_alive():
                return thread.name
        return None

    def _root_went(self) -> bool:
        """Whether the share's folder is not the one watched any more (watchdog's thread
        ends once it is deleted, a moment before its event says so)."""
        try:
            info = os.lstat(self.root)
        except OSError:
            return True
        return (info.st_ino, info.st_dev) != self._root_id

    def _written_due(self) -> dict[str, float]:
        """When each file written and not closed is to be reported."""
        quiet, longest = self.written_quiet, self.written_max
        return {p: min(last + quiet, first + longest) for p, (first, last) in self._written.items()}

    async def _settle(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait until no event came for ``quiet`` seconds, ``max_delay`` at most."""
        first = loop.time()
        while True:
            due = min(self._last + self.quiet, first + self.max_delay)
            wait = due - loop.time()
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    # -- from watchdog's threads -----------------------------------------------------

    def _relative(self, raw: bytes | str) -> str | None:
        """The share-relative path of an event's path; None for what is never reported
        (the share itself, ``.backer/``, backer's temp files, anything outside)."""
        path = os.fsdecode(raw)
        if not path.startswith(self._prefix):
            return None
        relative = path[len(self._prefix) :]
        if os.sep != "/":
            relative = relative.replace(os.sep, "/")
        first, _, _ = relative.partition("/")
        if not relative or first == METADATA_DIR or is_temp_name(relative.rpartition("/")[2]):
            return None
        return relative

    def _from_thread(self, paths: list[tuple[str, bool]]) -> None:
        """Queue paths for the loop; one wake-up per batch, not one per event."""
        with self._inbox_lock:
            wake = not self._inbox
            self._inbox += paths
        if wake:
            self._call(self._drain)

    def _call(self, callback: Callable[..., object], *args: object) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # it closed meanwhile: nobody waits
                loop.call_soon_threadsafe(callback, *args)

    def _event(self, event: FileSystemEvent) -> None:
        if isinstance(event, DirDeletedEvent) and os.fsdecode(event.src_path) == os.fspath(
            self.root
        ):
            log.warning(GONE.format(root=self.root))
            self._call(self._want_full, "gone")  # the scan reports the missing folder
            return
        found = []
        for raw in (event.src_path, event.dest_path):
            relative = self._relative(raw) if raw else None
            if relative is not None:
                found.append((relative, event.is_directory))
        if found:
            self._from_thread(found)

    def written(self, paths: list[tuple[bytes, bool]]) -> None:
        """Files written (from the written-file instance's thread), each with whether
        it was closed since: a closed one was reported by its close."""
        found = [(r, closed) for raw, closed in paths if (r := self._relative(raw)) is not None]
        if found:
            self._call(self._wrote, found)

    def overflowed(self) -> None:
        """The kernel dropped events: only a full scan can tell what changed."""
        self._call(self._want_full, "overflow")

    def rescan(self, reason: str) -> None:
        """Ask for a full scan with the next batch (from any thread): something other
        than the disk says that the share's record of it is out of date."""
        self._call(self._want_full, reason)

    def unlisted(self, raw: bytes, walk_again: Callable[[bytes], bool]) -> None:
        """A directory could not be listed for want of file descriptors (its
        subdirectories are unwatched, its entries unreported): ``walk_again`` it later."""
        self._call(self._unlisted_later, raw, walk_again)

    def unwatched(self, raw: bytes) -> None:
        """A directory could not be watched (the watch limit): poll it instead (the
        share itself, when its watches could not be rebuilt after an overflow)."""
        path = os.fsdecode(raw)
        relative = "" if path == os.fspath(self.root) else self._relative(raw)
        if relative is not None:
            self._call(self._unwatched, relative, path)

    # -- in the loop -----------------------------------------------------------------

    def _drain(self) -> None:
        with self._inbox_lock:
            arrived, self._inbox = self._inbox, []
        fresh = False  # a path seen again keeps the batch open too (the quiet window)
        for path, is_dir in arrived:
            if path in self._pending or not self.is_ignored(path, is_dir):
                self._pending.add(path)
                fresh = True
        if fresh:
            self._wake()

    def _wrote(self, found: list[tuple[str, bool]]) -> None:
        assert self._loop is not None
        now = self._loop.time()
        waiting = bool(self._written)
        for path, closed in found:
            if closed:
                self._written.pop(path, None)
            elif not self.is_ignored(path, False):
                first, _ = self._written.get(path, (now, now))
                self._written[path] = (first, now)
        if self._written and not waiting:  # (the loop's wait may be longer than this one's)
            self._arrived.set()

    def changed(self, path: str) -> None:
        """``path`` changed though no event said so (in the loop): a read for a peer
        found its recorded bytes gone. Scanned with the next batch, as if watched; but
        once more within ``written_quiet`` s of that, only when that time is over (as a
        file written and not closed is): a file rewritten without pause whose bytes a peer
        kept asking for was hashed whole and recorded again at every batch (R65)."""
        assert self._loop is not None
        now = self._loop.time()
        while self._stale_at and now - next(iter(self._stale_at.values())) >= self.written_quiet:
            del self._stale_at[next(iter(self._stale_at))]  # (oldest first: bounded)
        if (last := self._stale_at.get(path)) is not None:
            if path not in self._written:
                self._written[path] = (last, last)  # (due when its quiet time is over)
                self._arrived.set()
            return
        self._stale_at[path] = now
        self._pending.add(path)
        self._wake()

    def _want_full(self, reason: str) -> None:
        self._full = self._full or reason
        self._wake()

    def _wake(self) -> None:
        assert self._loop is not None
        self._last = self._loop.time()
        self._arrived.set()

    def _unlisted_later(self, raw: bytes, walk_again: Callable[[bytes], bool]) -> None:
        if not self._unlisted:
            log.debug("cannot list %s: out of file descriptors; walked again later", raw)
        self._unlisted[raw] = walk_again
        self._short.set()

    async def _walk_again(self) -> None:
        """Walk again, with backoff, the directories that could not be listed, and
        report each one that now could (its whole subtree is scanned)."""
        delay = SHORT_RETRY[0]
        while True:
            await self._short.wait()
            await asyncio.sleep(delay)
            self._short.clear()
            unlisted, self._unlisted = self._unlisted, {}
            listed = await asyncio.to_thread(_listed_now, unlisted)
            # (what failed again came back through ``unlisted``, before this result)
            delay = min(2 * delay, SHORT_RETRY[1]) if self._unlisted else SHORT_RETRY[0]
            found = [(r, True) for raw in listed if (r := self._relative(raw)) is not None]
            if found:
                self._from_thread(found)

    def _unwatched(self, relative: str, path: str) -> None:
        if not self._warned:
            self._warned = True
            self._warn_limit(path)
        self._poll(relative)

    def _warn_limit(self, path: str) -> None:
        limit = "?"
        for source in ("/proc/sys/user/max_inotify_watches", WATCHES_SYSCTL):
            with contextlib.suppress(OSError):  # the first: this user namespace's own
                limit = Path(source).read_text().strip()
                break
        log.warning(LIMIT_HINT.format(limit=limit, path=path, every=self.poll_every))

    def _poll(self, relative: str) -> None:
        """Poll a subtree (unless one around it already is)."""
        if under_any(relative, self.polled):
            return
        self.polled = {p for p in self.polled if not under_any(p, {relative})} | {relative}
        if self._poller is None:
            self._poller = _Poller(self)
            self._poller.start()
        self._poller.add(relative)


def _listed_now(unlisted: dict[bytes, Callable[[bytes], bool]]) -> list[bytes]:
    """The directories that could not be listed and can be now (each walked again)."""
    return [raw for raw, walk_again in unlisted.items() if walk_again(raw)]


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher

    def dispatch(self, event: FileSystemEvent) -> None:
        self.watcher._event(event)


class _Poller(threading.Thread):
    """One thread polling the subtrees inotify could not watch: every ``poll_every``
    seconds an lstat snapshot of each, compared with the last one. A subtree is
    reported as a whole once its first snapshot is taken (what changed before that is
    in no snapshot)."""

    def __init__(self, watcher: Watcher) -> None:
        super().__init__(name="backer-poll", daemon=True)
        self.watcher = watcher
        self.stop = threading.Event()
        self._wake = threading.Event()
        self._added = threading.Condition()
        self._new: list[str] = []
        self._wanted = self._taken = 0  # subtrees added, and given their first snapshot
        self._snapshots: dict[str, dict[str, tuple[int, int, int, int]]] = {}

    def add(self, relative: str) -> None:
        with self._added:
            self._new.append(relative)
            self._wanted += 1
        self._wake.set()

    def close(self) -> None:
        self.stop.set()
        self._wake.set()

    def caught_up(self) -> None:
        """Wait until every subtree added so far has its first snapshot."""
        with self._added:
            self._added.wait_for(lambda: self._taken >= self._wanted or self.stop.is_set())

    def run(self) -> None:
        try:
            self._run()
        finally:
            with self._added:
                self.stop.set()
                self._added.notify_all()

    def _run(self) -> None:
        watcher = self.watcher
        while not self.stop.is_set():
            self._wake.clear()
            changed: list[tuple[str, bool]] = []
            for top, before in list(self._snapshots.items()):
                if self.stop.is_set():
                    return
                after = self._snapshots[top] = _snapshot(watcher.root, top)
                for path in before.keys() | after.keys():
                    if before.get(path) != after.get(path):
                        key = after.get(path) or before[path]
                        changed.append((path, stat.S_ISDIR(key[3])))
            with self._added:
                new, self._new = self._new, []
            for top in new:
                if not under_any(top, set(self._snapshots)):
                    self._snapshots = {
                        t: s for t, s in self._snapshots.items() if not under_any(t, {top})
                    }
                    self._snapshots[top] = _snapshot(watcher.root, top)
                    if top:  # what changed before its first snapshot: scanned after it
                        changed.append((top, True))
            with self._added:
                self._taken += len(new)
                self._added.notify_all()
            if changed:
                watcher._from_thread(changed)
            self._wake.wait(watcher.poll_every)


def _snapshot(root: Path, top: str) -> dict[str, tuple[int, int, int, int]]:
    """lstat keys (as the scanner compares them, a directory's mtime left out: an entry
    added or removed is reported itself) of ``top`` and everything below it, without
    ``.backer/`` and backer's temp files."""
    found: dict[str, tuple[int, int, int, int]] = {}
    stack = [top]
    if top:
        try:
            found[top] = entry_key(stat_key_of(os.lstat(os.path.join(root, top))))
        except OSError:
            return found
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(os.path.join(root, directory)))
        except OSError:
            continue
        for entry in entries:
            if (not directory and entry.name == METADATA_DIR) or is_temp_name(entry.name):
                continue
            path = f"{directory}/{entry.name}" if directory else entry.name
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            found[path] = entry_key(stat_key_of(info))
            if stat.S_ISDIR(info.st_mode):
                stack.append(path)
    return found


if sys.platform.startswith("linux"):
    from watchdog.observers.inotify import InotifyEmitter, InotifyObserver, InotifyWatchGroup
    from watchdog.observers.inotify_c import InotifyConstants as In
    from watchdog.observers.inotify_c import (
        InotifyEvent,
        InotifyFD,
        Mask,
        WatchDescriptor,
        inotify_add_watch,
        inotify_init,
        inotify_rm_watch,
    )

    def _listing(top: bytes, skip: bytes, unlisted: list[bytes]) -> list[os.DirEntry[bytes]]:
        """The entries of the folder ``top`` but ``skip``; none if it cannot be listed
        (gone, unreadable: the scan reports it), and then, when that was for want of
        file descriptors, ``top`` goes into ``unlisted``."""
        try:
            with os.scandir(top) as found:
                return [e for e in found if e.path != skip]
        except OSError as exc:
            if exc.errno in SHORT_OF_DESCRIPTORS:
                unlisted.append(top)
            return []

    # What can change a name or content; IN_DELETE_SELF lets watchdog see the share go.
    MASK = Mask(
        In.IN_CREATE
        | In.IN_DELETE
        | In.IN_MOVED_FROM
        | In.IN_MOVED_TO
        | In.IN_CLOSE_WRITE
        | In.IN_ATTRIB
        | In.IN_DELETE_SELF
    )

    @dataclass
    class _Watches(InotifyWatchGroup):
        """watchdog's recursive watches of one share, with what watchdog only logs
        told to the Watcher (a queue overflow, a directory it could not watch), and
        ``.backer/`` left unwatched."""

        watcher: Watcher | None = None

        def on_queue_overflow(self) -> None:
            super().on_queue_overflow()  # the watches are rebuilt first
            if self.watcher is not None:
                if self.is_active and self.path not in self._active_callbacks_by_path:
                    self.watcher.unwatched(self.path)  # watchdog only logs that
                self.watcher.overflowed()

        def _add_all_callbacks(self, path: bytes) -> None:
            """Watch ``path`` and every folder below it (iteratively: R35)."""
            self._watch_below(path)

        def _watch_below(self, path: bytes) -> bool:
            """:meth:`_add_all_callbacks`; whether ``path`` could be listed. A folder
            below it that was already watched is not walked again: what it held when its
            watch was added was walked then, and what came since raised its own events.
            (watchdog walks every folder below each new one: a chain of new folders
            made faster than the watcher reads their events cost O(depth²) listings.)"""
            metadata = os.path.join(self.path, METADATA_DIR.encode())
            if path == metadata or path.startswith(metadata + b"/"):
                return True
            self._add_callback(path)
            if not self.is_recursive or not os.path.isdir(path):
                return True
            unlisted: list[bytes] = []
            pending = [path]  # (iteratively: os.walk recursed and 1,000 levels raised, R35)
            while pending:
                for entry in _listing(pending.pop(), metadata, unlisted):
                    if entry.is_dir(follow_symlinks=False) and self._watch(entry.path):
                        pending.append(entry.path)
            self._tell_unlisted(unlisted)
            return path not in unlisted

        def walk_again(self, path: bytes) -> bool:
            """Watch ``path`` and what is below it again, after it could not be listed
            for want of file descriptors (from the watcher's retry, in a worker
            thread); whether it could be listed now."""
            with self._lock:
                return self.is_active and self._watch_below(path)

        def _tell_unlisted(self, unlisted: list[bytes]) -> None:
            if self.watcher is not None:
                for path in unlisted:
                    self.watcher.unlisted(path, self.walk_again)

        def _recursive_simulate(self, src_path: bytes) -> list[InotifyEvent]:
            """None: watchdog's made-up events for what a new folder already holds. The
            folder's own event, handed over once its watches are added, makes the node
            scan its whole subtree; those events named nothing more, for a walk of the
            subtree at each new level (O(depth²) on a chain of new folders)."""
            return []

        def _add_callback(self, path: bytes) -> None:
            self._watch(path)

        def _watch(self, path: bytes) -> bool:
            """Watch ``path`` (for written files too); whether that made a new watch (its
            folder was not watched already, under this name or another)."""
            writes = self.watcher.writes if self.watcher is not None else None
            try:
                try:
                    wd = self._add_watch(path)
                except OSError as exc:  # the written-file watches are given back first
                    if exc.errno != errno.ENOSPC or writes is None or not writes.give_back():
                        raise
                    wd = self._add_watch(path)
            except OSError as exc:
                if path == self.path:
                    raise
                if exc.errno == errno.ENOSPC and self.watcher is not None:
                    self.watcher.unwatched(path)
                return False  # else it is gone or unreadable: the scan reports that
            new = wd not in self._active_callbacks_by_watch
            self._active_callbacks_by_path[path] = wd
            self._active_callbacks_by_watch[wd] = path
            if writes is not None:
                writes.watch(path, wd, self._active_callbacks_by_watch)
            return new

        def _add_watch(self, path: bytes) -> WatchDescriptor:
            return self._inotify_fd.add_callback(path, self.event_mask, self._callback, self._id)

    WRITES_MASK = In.IN_MODIFY | In.IN_CLOSE_WRITE | In.IN_ONLYDIR | In.IN_EXCL_UNLINK
    _EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; name

    class _Writes(threading.Thread):
        """The written-file instance (see the module's docstring): its own inotify
        descriptor, a watch on each folder the main instance watches, read at most every
        WRITTEN_GATHER seconds. A folder is named by the main instance's watch (which
        watchdog moves with the folder)."""

        def __init__(self, watcher: Watcher) -> None:
            super().__init__(name="backer-writes", daemon=True)
            self.watcher = watcher
            fd = inotify_init()
            if fd < 0:
                raise OSError(ctypes.get_errno(), "inotify_init failed")
            self._fd = fd
            os.set_blocking(fd, False)
            self._stop_r, self._stop_w = os.pipe()
            self._folders: dict[int, tuple[int, dict[WatchDescriptor, bytes]]] = {}  # wd:
            # the main instance's wd of that folder and where that instance names it
            self._lock = threading.Lock()
            self._full = False  # at the watch limit: no more watches of its own

        def watch(
            self, path: bytes, main: WatchDescriptor, names: dict[WatchDescriptor, bytes]
        ) -> None:
            """Watch the folder ``path`` too, as the main instance does with ``main``."""
            with self._lock:
                if self._full or self._fd < 0:
                    return
                wd = inotify_add_watch(self._fd, path, WRITES_MASK)
                if wd >= 0:
                    self._folders[wd] = (main, names)
                elif ctypes.get_errno() == errno.ENOSPC:
                    self._full = True
                    log.debug(
                        "at the watch limit: files written and not closed are seen "
                        "at the periodic scan only below %s",
                        path,
                    )

        def give_back(self) -> bool:
            """Remove every watch of its own, for the main instance's (at the watch limit:
            a folder watched matters more than its files written and not closed); whether
            there were any."""
            with self._lock:
                self._full = True
                held, self._folders = self._folders, {}
                for wd in held:
                    inotify_rm_watch(self._fd, wd)
            if held:
                log.info(
                    "inotify watch limit reached: files written and not closed "
                    "are seen at the periodic scan only"
                )
            return bool(held)

        def close(self) -> None:
            if self.ident is None:  # never started
                self._release()
                return
            with contextlib.suppress(OSError):
                os.write(self._stop_w, b"!")

        def _release(self) -> None:
            with self._lock:
                if self._fd >= 0:
                    for fd in (self._fd, self._stop_r, self._stop_w):
                        os.close(fd)
                    self._fd = -1

        def run(self) -> None:
            try:
                poller = select.poll()
                poller.register(self._fd, select.POLLIN)
                poller.register(self._stop_r, select.POLLIN)
                while True:
                    ready = {fd for fd, _ in poller.poll()}
                    if self._stop_r in ready:
                        return
                    # (a close meanwhile ends the wait: the gathered events are dropped)
                    if select.select([self._stop_r], [], [], WRITTEN_GATHER)[0]:
                        return
                    self._read()
            finally:
                self._release()

        def _read(self) -> None:
            """Everything queued, told to the watcher: each file written, with whether it
            was closed since (backer's temp files left out). Events are only gathered by
            (folder, name) in the loop over them: a window's interleaved writes into its
            temp files are not merged by the kernel."""
            last: dict[tuple[int, bytes], int] = {}  # (wd, name): the mask of its last event
            size = _EVENT.size
            while True:
                try:
                    buffer = os.read(self._fd, 65536)
                except BlockingIOError:
                    break
                at = 0
                while at + size <= len(buffer):
                    wd, mask, _, length = _EVENT.unpack_from(buffer, at)
                    last[wd, buffer[at + size : at + size + length]] = mask
                    at += size + length
            written: list[tuple[bytes, bool]] = []
            for (wd, raw), mask in last.items():
                name = raw.rstrip(b"\0")
                if mask & In.IN_Q_OVERFLOW:
                    self.watcher.overflowed()
                elif mask & In.IN_IGNORED:
                    with self._lock:
                        self._folders.pop(wd, None)
                elif name and not is_temp_name(os.fsdecode(name)):
                    main, names = self._folders.get(wd, (-1, {}))
                    if (folder := names.get(main)) is not None:
                        written.append((os.path.join(folder, name), bool(mask & In.IN_CLOSE_WRITE)))
            if written:
                self.watcher.written(written)

    class _Emitter(InotifyEmitter):
        def __init__(self, *args: object, watcher: Watcher, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            self._watcher = watcher

        def on_thread_start(self) -> None:
            self._inotify = _Watches(
                self._inotify_fd,
                os.fsencode(self.watch.path),
                event_mask=MASK,
                is_recursive=self.watch.is_recursive,
                follow_symlink=False,
                watcher=self._watcher,
            )

    class _InotifyObserver(InotifyObserver):
        """watchdog's inotify observer, its emitters made with backer's hooks."""

        def __init__(self, watcher: Watcher) -> None:
            self._inotify_fd = InotifyFD()
            self._inotify_fd.start()
            BaseObserver.__init__(self, _Emitter, inotify_fd=self._inotify_fd, watcher=watcher)
