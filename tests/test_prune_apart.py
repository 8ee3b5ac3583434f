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

import pytest

from backer.model.share import Share
from backer.node import node as node_module
from backer.node.node import Runtime
from backer.versioner import prune as prune_module
from backer.versioner.prune import DROP_ALL, Survey, prune, prune_share, survey_apart
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
