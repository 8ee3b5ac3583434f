"""The watcher on real directories: what it reports, how it batches, how it degrades."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from backer.scanner import watch
from backer.scanner.ignore import temp_name
from backer.scanner.walk import under_any
from backer.scanner.watch import Changes, Watcher
from tests.helpers import timing

Until = Callable[[list[Changes]], bool]


async def gather(changes: AsyncIterator[Changes], until: Until, seconds: float) -> list[Changes]:
    """Batches until ``until`` holds for them (a TimeoutError after ``seconds``)."""
    got: list[Changes] = []
    async with asyncio.timeout(seconds):
        while not until(got):
            got.append(await anext(changes))
    return got


async def quiet_for(changes: AsyncIterator[Changes], seconds: float) -> list[Changes]:
    """Whatever batches come within ``seconds`` (none, when nothing happened)."""
    got: list[Changes] = []
    try:
        async with asyncio.timeout(seconds):
            while True:
                got.append(await anext(changes))
    except TimeoutError:
        return got


def union(batches: list[Changes]) -> set[str]:
    return set().union(*(b.paths for b in batches))


def has(*paths: str) -> Until:
    return lambda got: set(paths) <= union(got)


def in_thread(work: Callable[[], None]) -> threading.Thread:
    """Make changes from another thread, as another program would, while the loop runs."""
    thread = threading.Thread(target=work)
    thread.start()
    return thread


def never(path: str, is_dir: bool) -> bool:
    return False


def test_the_first_batch_is_a_full_start_scan(tmp_path: Path) -> None:
    async def main() -> Changes:
        async with Watcher(tmp_path, never) as watcher:
            return await anext(watcher.changes())

    assert asyncio.run(main()) == Changes(frozenset(), True, "start")


def test_hundred_writes_to_one_file_come_as_one_batch(tmp_path: Path) -> None:
    def write() -> None:
        for n in range(100):
            (tmp_path / "f").write_text(f"write {n}")
            time.sleep(0.002)

    async def main() -> list[Changes]:
        async with Watcher(tmp_path, never, quiet=0.2, max_delay=5.0) as watcher:
            changes = watcher.changes()
            await anext(changes)
            writer = in_thread(write)
            got = await gather(changes, has("f"), 10)
            await asyncio.to_thread(writer.join)
            return got + await quiet_for(changes, 0.6)

    assert asyncio.run(main()) == [Changes(frozenset({"f"}), False, "events")]


@timing
def test_burst_of_thousand_creates_arrives_whole_within_the_bounded_delay(tmp_path: Path) -> None:
    names = {f"d{n % 10}/file{n}" for n in range(1000)}
    for n in range(10):
        (tmp_path / f"d{n}").mkdir()
    created: list[float] = []

    def create() -> None:
        for name in sorted(names):
            (tmp_path / name).write_bytes(b"x")
        created.append(time.monotonic())

    async def main() -> tuple[list[Changes], float]:
        async with Watcher(tmp_path, never, quiet=0.05, max_delay=1.0) as watcher:
            changes = watcher.changes()
            await anext(changes)
            creator = in_thread(create)
            got = await gather(changes, has(*names), 20)
            seen = time.monotonic()
            await asyncio.to_thread(creator.join)
            return got, seen

    got, seen = asyncio.run(main())
    assert union(got) == names
    assert all(not batch.full for batch in got)
    assert seen - created[0] < 1.0 + 1.0  # max_delay, and slack for a busy machine


def test_renames_moves_deletes_and_directories_are_reported(tmp_path: Path) -> None:
    root = tmp_path
    (root / "a").write_bytes(b"a")
    (root / "sub").mkdir()
    (root / "gone").write_bytes(b"g")
    (root / "tree" / "deep").mkdir(parents=True)
    (root / "tree" / "deep" / "f").write_bytes(b"f")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "in").write_bytes(b"i")

    async def step(changes: AsyncIterator[Changes], act: Callable[[], None], *paths: str) -> None:
        act()
        got = await gather(changes, has(*paths), 10)
        assert all(under_any(path, set(paths)) for path in union(got))

    async def main() -> None:
        async with Watcher(root, never) as watcher:
            changes = watcher.changes()
            await anext(changes)
            await step(changes, lambda: os.rename(root / "a", root / "b"), "a", "b")
            await step(changes, lambda: os.rename(root / "b", root / "sub" / "b"), "b", "sub/b")
            await step(changes, lambda: (root / "gone").unlink(), "gone")
            await step(changes, lambda: (root / "new" / "inner").mkdir(parents=True), "new")
            await step(changes, lambda: os.rename(root / "tree", root / "moved"), "tree", "moved")
            await step(changes, lambda: shutil.rmtree(root / "moved"), "moved")
            await step(changes, lambda: os.rename(outside / "in", root / "in"), "in")
            await step(changes, lambda: (root / "sub").chmod(0o700), "sub")

    asyncio.run(main())


def test_ignored_temp_and_metadata_paths_are_not_reported(tmp_path: Path) -> None:
    root = tmp_path
    (root / ".backer").mkdir()

    def ignored(path: str, is_dir: bool) -> bool:
        return path == "build" or path.startswith("build/")

    async def main() -> list[Changes]:
        async with Watcher(root, ignored, quiet=0.1) as watcher:
            changes = watcher.changes()
            await anext(changes)
            (root / ".backer" / "backer.db-wal").write_bytes(b"w")
            (root / temp_name("f", "v1")).write_bytes(b"t")
            (root / "build").mkdir()
            (root / "build" / "out.o").write_bytes(b"o")
            (root / "marker").write_bytes(b"m")
            return await gather(changes, has("marker"), 10) + await quiet_for(changes, 0.5)

    assert union(asyncio.run(main())) == {"marker"}


def test_a_periodic_full_rescan_comes_without_any_event(tmp_path: Path) -> None:
    async def main() -> list[Changes]:
        async with Watcher(tmp_path, never, rescan_every=0.3) as watcher:
            changes = watcher.changes()
            return [await anext(changes) for _ in range(3)]

    assert [(c.full, c.reason) for c in asyncio.run(main())] == [
        (True, "start"),
        (True, "periodic"),
        (True, "periodic"),
    ]


def test_a_deleted_share_folder_is_reported_and_asks_for_a_full_scan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "share"
    (root / "d").mkdir(parents=True)

    async def main() -> list[Changes]:
        async with Watcher(root, never) as watcher:
            changes = watcher.changes()
            await anext(changes)
            shutil.rmtree(root)
            return await gather(changes, lambda got: any(c.full for c in got), 10)

    last = asyncio.run(main())[-1]
    assert (last.full, last.reason) == (True, "gone")
    assert "no longer watched" in caplog.text


def test_a_full_scan_still_names_the_ignore_file_that_changed(tmp_path: Path) -> None:
    """A full scan swallows pending paths, but the node must still see that the rules
    changed (it reloads ``is_ignored`` when ``.backerignore`` is named)."""

    async def main() -> Changes:
        async with Watcher(tmp_path, never, rescan_every=0.5) as watcher:
            changes = watcher.changes()
            await anext(changes)  # then a scan long enough for a periodic one to be due
            (tmp_path / ".backerignore").write_text("*.o\n")
            await asyncio.sleep(0.6)
            return await anext(changes)

    assert asyncio.run(main()) == Changes(frozenset({".backerignore"}), True, "periodic")


def test_observer_threads_end_with_the_watcher(tmp_path: Path) -> None:
    before = set(threading.enumerate())

    async def main() -> int:
        async with Watcher(tmp_path, never):
            return len(set(threading.enumerate()) - before)

    assert asyncio.run(main()) > 0
    assert set(threading.enumerate()) - before == set()


QUEUE_LIMIT = Path("/proc/sys/fs/inotify/max_queued_events")


@pytest.mark.skipif(os.geteuid() != 0, reason="setting max_queued_events needs root")
def test_inotify_queue_overflow_asks_for_a_full_rescan(tmp_path: Path) -> None:
    """A real overflow: the watcher's inotify instance is made with a 16-event queue
    (the limit is read when an instance is created, and restored right after)."""

    async def main() -> list[Changes]:
        saved = QUEUE_LIMIT.read_text()
        QUEUE_LIMIT.write_text("16")
        try:
            watcher = Watcher(tmp_path, never)
            await watcher.__aenter__()
        finally:
            QUEUE_LIMIT.write_text(saved)
        try:
            changes = watcher.changes()
            await anext(changes)
            for burst in range(5):  # each: ~6,000 events within milliseconds, from C
                names = [f"b{burst}-{n}" for n in range(2000)]
                await asyncio.to_thread(subprocess.run, ["touch", *names], cwd=tmp_path)
                with contextlib.suppress(TimeoutError):
                    return await gather(changes, lambda got: any(c.full for c in got), 3)
            raise AssertionError("no overflow")
        finally:
            await watcher.__aexit__(None, None, None)

    last = asyncio.run(main())[-1]
    assert (last.full, last.reason) == (True, "overflow")


LIMITED = """
import asyncio, json, logging, os, sys, time
from pathlib import Path
from backer.scanner.watch import Watcher

Path("/proc/sys/user/max_inotify_watches").write_text(sys.argv[2])
messages = []
handler = logging.Handler()
handler.emit = lambda record: messages.append(record.getMessage())
logging.getLogger("backer.watch").addHandler(handler)
root = Path(sys.argv[1])
deep = root / "d9" / "e9"

async def main():
    async with Watcher(root, lambda p, d: False, poll_every=0.2) as watcher:
        changes = watcher.changes()
        await anext(changes)
        (deep / "new").write_bytes(b"n")
        got = set()
        async with asyncio.timeout(10):
            while "d9/e9/new" not in got:
                got |= (await anext(changes)).paths
        (root / "top").write_bytes(b"t")
        async with asyncio.timeout(10):
            while "top" not in got:
                got |= (await anext(changes)).paths
        polled = sorted(watcher.polled)
        (root / "late" / "x").mkdir(parents=True)  # made while watching: no watch left
        async with asyncio.timeout(10):
            while not watcher.polled & {"", "late", "late/x"}:
                await anext(changes)
        (root / "late" / "x" / "f").write_bytes(b"f")
        got = set()
        async with asyncio.timeout(10):
            while not got & {"late", "late/x", "late/x/f"}:
                got |= (await anext(changes)).paths
        return polled

polled = asyncio.run(main())
print(json.dumps({"messages": messages, "polled": polled}))
"""


@pytest.mark.parametrize(("limit", "polled"), [(8, None), (0, [""])])
def test_watch_limit_warns_once_and_polls_what_it_cannot_watch(
    tmp_path: Path, limit: int, polled: list[str] | None
) -> None:
    """In a user namespace of its own (so no other process is affected), the limit of
    inotify watches is set below the share's 111 directories (or to none at all)."""
    for d in range(10):
        for e in range(10):
            (tmp_path / f"d{d}" / f"e{e}").mkdir(parents=True)
    probe = subprocess.run(["unshare", "-U", "-r", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no user namespaces here")
    result = subprocess.run(
        ["unshare", "-U", "-r", sys.executable, "-c", LIMITED, str(tmp_path), str(limit)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    (message,) = report["messages"]
    assert "fs.inotify.max_user_watches" in message
    if polled is not None:
        assert report["polled"] == polled
    else:
        assert report["polled"] and "" not in report["polled"]


SHORT_OF_DESCRIPTORS = """
import asyncio, json, os, resource, sys
from pathlib import Path
from backer.scanner.walk import under_any
from backer.scanner.watch import Watcher

root, count = Path(sys.argv[1]), int(sys.argv[2])
folders = {f"d{n}" for n in range(count)}

async def until(changes, wanted, seconds):
    got = set()
    try:
        async with asyncio.timeout(seconds):
            while not all(under_any(path, got) for path in wanted):
                got |= (await changes.get()).paths
    except TimeoutError:
        pass
    return got

async def pump(watcher, changes):
    async for batch in watcher.changes():
        changes.put_nowait(batch)

async def main():
    async with Watcher(root, lambda p, d: False) as watcher:
        changes = asyncio.Queue()
        pumping = asyncio.create_task(pump(watcher, changes))
        await changes.get()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        in_use = len(os.listdir("/proc/self/fd")) - 1  # (the listing's own descriptor)
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use, hard))
        for folder in sorted(folders):  # no descriptor needed to make these
            os.makedirs(root / folder / "sub")
            os.mknod(root / folder / "sub" / "early")
        named = await until(changes, folders, 10)
        await until(changes, {"never"}, 0.5)  # (whatever the burst still brings)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        again = await until(changes, folders, 10)  # no event: the watcher's own retry
        for folder in folders:
            (root / folder / "sub" / "late").write_bytes(b"late")
        late = await until(changes, {f"{f}/sub/late" for f in folders}, 10)
        pumping.cancel()
        return named, again, late

print(json.dumps([sorted(paths) for paths in asyncio.run(main())]))
"""


def test_folders_that_could_not_be_listed_for_want_of_descriptors_are_walked_again(
    tmp_path: Path,
) -> None:
    """A burst of new folders meets the process's descriptor limit (lowered for real, in
    a process of its own): the watcher could not list them, so their subfolders went
    unwatched and what they held unreported until some later event. Once descriptors
    are free again it walks them again by itself and reports them whole (a scan then
    records what a scan at the limit could not), and what is later written in their
    subfolders is seen."""
    count = 20
    result = subprocess.run(
        [sys.executable, "-c", SHORT_OF_DESCRIPTORS, str(tmp_path), str(count)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 0, result.stderr
    named, again, late = (set(paths) for paths in json.loads(result.stdout))
    folders = {f"d{n}" for n in range(count)}
    assert folders <= named  # (their own events need no descriptor)
    assert folders <= again, again
    assert all(under_any(f"{folder}/sub/late", late) for folder in folders), late


def _chain(root: int, name: str, depth: int) -> int:
    """A descriptor of the bottom of ``name``/``name``/... ``depth`` levels under
    ``root`` (made by descriptor: the path is beyond what pathlib recurses)."""
    fd = os.dup(root)
    for _ in range(depth):
        os.mkdir(name, dir_fd=fd)
        fd, parent = os.open(name, os.O_RDONLY, dir_fd=fd), fd
        os.close(parent)
    return fd


def _unchain(root: int, name: str, depth: int) -> None:
    """Remove such a chain (shutil.rmtree, as pytest's tmp_path clean-up, recurses)."""
    for level in range(depth, 0, -1):
        folder = "/".join([name] * level)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{folder}/f", dir_fd=root)
        os.rmdir(folder, dir_fd=root)


def test_R35_a_tree_deeper_than_the_recursion_limit_is_watched(tmp_path: Path) -> None:
    """The watches were added with os.walk, and watchdog walks a new folder with it
    too: both recurse. A tree of 1,000 levels (a 3 KB path, valid; any member can make
    one) raised RecursionError at every start of the watcher (the node never served
    the share again), and one made while watching killed the watcher's thread (nothing
    was reported any more). Now such a tree is watched to the bottom."""
    root = tmp_path / "share"
    root.mkdir()
    top = os.open(root, os.O_RDONLY)
    old = _chain(top, "d", 1200)
    deep_old = "/".join(["d"] * 1200)
    try:

        async def main() -> list[Changes]:
            async with Watcher(root, never, quiet=0.05) as watcher:
                changes = watcher.changes()
                await anext(changes)
                os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=old))
                return await gather(changes, has(f"{deep_old}/f"), 10)

        assert f"{deep_old}/f" in union(asyncio.run(main()))
    finally:
        os.close(old)
        _unchain(top, "d", 1200)
        os.close(top)


COUNTED = """
import asyncio, os, sys
from pathlib import Path

listings = 0
real_scandir = os.scandir

def counted(path):
    global listings
    listings += 1
    return real_scandir(path)

os.scandir = counted
from backer.scanner.watch import Watcher

async def main():
    async with Watcher(Path(sys.argv[1]), lambda p, d: False) as watcher:
        changes = watcher.changes()
        await anext(changes)
        before = listings
        print("watching", flush=True)
        got = set()
        while "marker" not in got:  # (made after the chain: its event comes last)
            got |= (await anext(changes)).paths
        print(listings - before, sorted(got), flush=True)

asyncio.run(main())
"""


def test_a_chain_of_new_folders_is_listed_at_most_twice_per_level(tmp_path: Path) -> None:
    """A chain of folders made while watching, each level's event read while deeper
    ones were being made: each event walked the whole chain below it, twice (its
    watches, then watchdog's made-up events for what it held), 2.5 to 8 listings per
    level here and 23 s of CPU for 1,000 levels. Now a folder is listed when its watch
    is first added and for its own event, no more, whatever the interleaving."""
    root = tmp_path / "share"
    root.mkdir()
    depth = 500
    watcher = subprocess.Popen(
        [sys.executable, "-c", COUNTED, str(root)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    top = os.open(root, os.O_RDONLY)
    try:
        assert watcher.stdout is not None and watcher.stdout.readline() == "watching\n"
        bottom = _chain(top, "d", depth)
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=bottom))
        os.close(bottom)
        (root / "marker").write_bytes(b"")
        out, _ = watcher.communicate(timeout=300)
        listings, reported = out.split(" ", 1)
        assert "'d'" in reported  # (the whole chain, the file at its bottom with it)
        assert int(listings) <= 2 * depth + 10, listings
    finally:
        watcher.kill()
        watcher.wait()
        _unchain(top, "d", depth)
        os.close(top)


def test_a_watcher_whose_thread_died_says_so_instead_of_going_quiet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception in watchdog's thread (R35: a RecursionError on a deep tree) ended it,
    and the node then saw no local change until the hourly full scan. The watcher now
    checks its threads and raises, so that the node restarts the share."""
    if not sys.platform.startswith("linux"):
        pytest.skip("inotify's own thread")
    monkeypatch.setattr(watch, "ALIVE_EVERY", 0.1)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # (the expected one)

    def broken(self: object, path: bytes) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    async def main() -> None:
        async with Watcher(tmp_path, never, quiet=0.05) as watcher:
            changes = watcher.changes()
            await anext(changes)
            monkeypatch.setattr(watch._Watches, "_add_all_callbacks", broken)
            (tmp_path / "new-folder").mkdir()
            async with asyncio.timeout(10):
                with pytest.raises(watch.WatcherStopped):
                    while True:
                        await anext(changes)

    asyncio.run(main())


def test_a_file_written_and_not_closed_is_reported_once_its_writes_pause(tmp_path: Path) -> None:
    """A file kept open and written (a log, a database) or cut by ``truncate(2)`` raised
    no event the watcher listened to: a running node saw it only at the hourly scan
    (a 200 MiB file truncated to 0 stayed current on its device and unreadable to its
    peers). Reported after ``written_quiet`` s without a write; a closed file at once."""
    (tmp_path / "kept.log").write_text("")
    (tmp_path / "cut.bin").write_bytes(b"x" * 100_000)
    log = open(tmp_path / "kept.log", "a")  # noqa: SIM115 (kept open on purpose)

    async def main() -> tuple[list[Changes], list[Changes], float]:
        async with Watcher(tmp_path, never, written_quiet=0.3, written_max=5.0) as watcher:
            changes = watcher.changes()
            await anext(changes)
            started = time.monotonic()
            log.write("a line, flushed, the file still open\n")
            log.flush()
            os.truncate(tmp_path / "cut.bin", 10)
            got = await gather(changes, has("kept.log", "cut.bin"), 10)
            waited = time.monotonic() - started
            (tmp_path / "closed.txt").write_text("saved\n")
            return got, await gather(changes, has("closed.txt"), 10), waited

    try:
        written, closed, waited = asyncio.run(main())
    finally:
        log.close()
    assert union(written) == {"kept.log", "cut.bin"} and all(not b.full for b in written)
    assert waited >= 0.3, waited  # (after the writes paused, not at the first of them)
    assert union(closed) == {"closed.txt"}


def test_R65_a_file_read_stale_again_and_again_is_scanned_as_a_written_one_is(
    tmp_path: Path,
) -> None:
    """A read for a peer that finds a recorded file's bytes changed names the file to the
    watcher (``changed``), and it was scanned with the very next batch: a file rewritten
    without pause (a database, a VM image) whose chunks a peer kept asking for (a member
    on purpose, or an honest peer taking each version it was told of) was hashed whole
    and recorded again at every batch. A stale read still has the file scanned at once,
    but once more within ``written_quiet`` s only when that time is over."""
    (tmp_path / "db.bin").write_bytes(b"x" * 1000)

    async def main() -> tuple[list[Changes], float]:
        async with Watcher(
            tmp_path, never, quiet=0.01, max_delay=0.05, written_quiet=0.25, written_max=0.5
        ) as watcher:
            changes = watcher.changes()
            await anext(changes)
            loop = asyncio.get_running_loop()
            got: list[tuple[float, Changes]] = []

            async def collect() -> None:
                async for batch in changes:
                    got.append((loop.time(), batch))

            collecting = asyncio.create_task(collect())
            started = loop.time()
            for _ in range(100):  # ~2 s of reads for a peer that find the file changed
                watcher.changed("db.bin")
                asked = loop.time()
                await asyncio.sleep(0.02)
            async with asyncio.timeout(5):  # (its last report)
                while not got or got[-1][0] < asked:
                    await asyncio.sleep(0.05)
            collecting.cancel()
            return [batch for _, batch in got], loop.time() - started

    batches, seconds = asyncio.run(main())
    assert all(b.paths == {"db.bin"} for b in batches)
    assert 1 <= len(batches) <= 2 * seconds / 0.25 + 2, (len(batches), seconds)  # (not 100)
