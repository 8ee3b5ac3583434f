"""The node's hourly prune reads every recorded version in a worker thread (tens of
seconds at a million files, which held its loop and timed out peers' handshakes), and
removes only what a survey of the share as it still is says."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
from pathlib import Path
from types import SimpleNamespace

import nacl.signing
import pytest

from backer.model import entropy
from backer.model.materializer import DiskFull
from backer.model.records import Version
from backer.model.share import Share
from backer.node import node as node_module
from backer.node.commands import MB, warn_disk_full
from backer.node.node import Node, Runtime
from backer.versioner import prune as prune_module
from backer.versioner.prune import (
    DROP_ALL,
    Survey,
    held_by_kept,
    prune,
    prune_share,
    survey_apart,
)
from backer.versioner.store import Store
from tests.helpers import make_devices


def _edited(tmp_path: Path) -> Share:
    """A share whose one file an editor saved three times (a new file renamed over the
    old): two replaced versions kept."""
    (share,) = make_devices(tmp_path, 1)
    for _ in range(3):
        (share.root / "a.saving").write_bytes(os.urandom(1000))
        (share.root / "a.saving").replace(share.root / "a.txt")
        share.scan()
    return share


def test_a_survey_read_apart_drops_what_a_survey_read_in_place_does(tmp_path: Path) -> None:
    share = _edited(tmp_path)
    now = 2**42
    with share.db.conn:
        in_place = prune(share.root, share.catalog, now, dry_run=True, policy=DROP_ALL)
        apart = prune(
            share.root, share.catalog, now, True, DROP_ALL, surveyed=survey_apart(share.root)
        )
    assert in_place.files == apart.files == 2 and in_place.bytes == apart.bytes > 0
    share.close()


def _runtime(share: Share, surveys: list[Survey]) -> SimpleNamespace:
    """What :meth:`Runtime.prune_apart` uses of a runtime, over a real share."""

    def pruned(surveyed: Survey) -> object:
        surveys.append(surveyed)
        return prune_share(share, 2**42, policy=DROP_ALL, surveyed=surveyed)

    return SimpleNamespace(
        share=share,
        node=SimpleNamespace(scale=0.001),
        name="test",
        log=logging.getLogger("test"),
        prune=pruned,
        check_root=lambda: True,
    )


@pytest.mark.parametrize("outdated", [1, node_module.PRUNE_TRIES])
def test_the_node_drops_a_survey_the_share_changed_under(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outdated: int
) -> None:
    """While the worker thread reads, the loop records a change: that survey is not
    used (it may name as unneeded a content the change made needed); a fresh one is,
    or none at all when every read was outdated."""
    share = _edited(tmp_path)
    held = set(Store(share.root, share.catalog).contents())
    reads = 0

    def change_in_the_loop(n: int) -> None:
        with share.db.conn:
            share.catalog.set_meta("test.change", n)

    async def run() -> object:
        loop = asyncio.get_running_loop()

        def read(root: Path, stop: threading.Event) -> Survey:
            nonlocal reads
            reads += 1
            if reads <= outdated:  # (runs in the loop before the read is handed back)
                loop.call_soon_threadsafe(change_in_the_loop, reads)
            return survey_apart(root, stop)

        monkeypatch.setattr(node_module, "survey_apart", read)
        return await Runtime.prune_apart(_runtime(share, used))  # type: ignore[arg-type]

    used: list[Survey] = []
    report = asyncio.run(run())
    if outdated < node_module.PRUNE_TRIES:
        assert reads == outdated + 1 and len(used) == 1 and report is not None
        assert len(set(Store(share.root, share.catalog).contents())) == len(held) - 2
    else:
        assert reads == node_module.PRUNE_TRIES and not used and report is None
        assert set(Store(share.root, share.catalog).contents()) == held
    share.close()


def test_a_survey_stops_at_its_next_step_once_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node stopping waits for its worker threads: a survey of a million versions
    (~30 CPU s) must end as soon as the node says stop."""
    monkeypatch.setattr(prune_module, "STOP_CHECK_STEPS", 1)  # (this share is tiny)
    share = _edited(tmp_path)
    stop = threading.Event()
    stop.set()
    with pytest.raises(sqlite3.OperationalError, match="interrupted"):
        survey_apart(share.root, stop)
    assert survey_apart(share.root, threading.Event()).held  # (not set: it reads)
    share.close()


def _replaced(tmp_path: Path, files: int) -> Share:
    """A share of ``files`` files, each then saved again by an editor (a new file
    renamed over it): ``files`` replaced versions kept in the store."""
    (share,) = make_devices(tmp_path, 1)
    for n in range(files):
        (share.root / f"f{n}.txt").write_bytes(os.urandom(5000))
    share.scan()
    for n in range(files):
        (share.root / "saving").write_bytes(os.urandom(5000))
        (share.root / "saving").replace(share.root / f"f{n}.txt")
    share.scan()
    return share


def test_a_full_disk_line_reads_kept_versions_off_the_loop_once_until_the_catalog_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The node's disk-full warning read and decoded every recorded version in the loop,
    each time the line's wording changed (every retry: "N MB more needed"): seconds of
    a stalled loop at a million files, and sessions timed out. Now the loop's own
    connection does a bounded number of SQLite steps and decodes no version, whatever
    the share's size, and the reading is not repeated until the catalog changes."""
    files = 1000
    share = _replaced(tmp_path, files)
    in_place = held_by_kept(share.root, share.catalog, entropy.now_ms())
    assert in_place >= files * 5000
    decoded: dict[str, int] = {"loop": 0, "worker": 0}
    real_decode = Version.decode
    loop_thread = threading.get_ident()

    def counted(record: bytes) -> Version:
        decoded["loop" if threading.get_ident() == loop_thread else "worker"] += 1
        return real_decode(record)

    monkeypatch.setattr(Version, "decode", staticmethod(counted))
    steps = 0

    def step() -> int:
        nonlocal steps
        steps += 1
        return 0

    share.db.conn.set_progress_handler(step, 1)  # every step of the loop's connection

    async def run() -> tuple[Runtime, int]:
        node = Node([], nacl.signing.SigningKey.generate(), listen=("127.0.0.1", 0),
                    log=logging.getLogger("backer.test"), home=tmp_path / "home")  # fmt: skip
        runtime = Runtime(node, share, "big")
        full = DiskFull(share.root, 3 * MB)
        runtime.disk_full_logged = str(full)  # (what Runtime._applied notes, then warns)
        before = steps
        await warn_disk_full(runtime, full)
        return runtime, steps - before

    with caplog.at_level(logging.WARNING, "backer.test"):
        runtime, loop_steps = asyncio.run(run())
    share.db.conn.set_progress_handler(None, 1)
    said = runtime.disk_full_said
    assert said is not None and said.startswith(f"disk full: 3 MB more needed in {share.root}")
    assert f"hold {-(-in_place // MB)} MB" in said and "'backer prune --all' frees it now" in said
    assert said in caplog.text
    assert decoded["loop"] == 0 and decoded["worker"] >= 2 * files
    assert loop_steps < 100, loop_steps  # (the read in place: several per version)

    async def again() -> int:
        return await runtime.kept.measure(share)

    decoded["worker"] = 0
    assert asyncio.run(again()) == in_place and decoded["worker"] == 0  # nothing changed
    (share.root / "f0.txt").unlink()
    share.scan()  # its content is kept now: prune --all would free more
    assert asyncio.run(again()) > in_place and decoded["worker"] >= 2 * files
    share.close()
