"""Where a sync's plan is held: on the share's own disk, not in the system's temp
directory (R42)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import sqlite_utils

from backer.db.catalog import Catalog
from backer.model.materializer import DiskFull, plan
from backer.model.records import Kind, Version, make_key, new_version_id
from backer.model.state import Delta
from tests.e2e import Device, free_port, invite
from tests.helpers import small_disk

LEVEL = "d" * 240  # folder names of 240 bytes: a few hundred files make a plan of MBs
DEPTH = 14
FILES = 600


def test_R42_a_join_plans_on_the_shares_disk_when_the_temp_directory_is_full(
    tmp_path: Path,
) -> None:
    """A plan of a few MB joined into a device whose temp directory (TMPDIR: a small
    or nearly full tmpfs /tmp) has 1 MiB of room: the plan's temporary database
    spilled there past its 2 MiB page cache, and the join failed with 'internal error:
    OperationalError: database or disk is full', every time, while the share's own
    disk had room to spare (a million-file share's plan is ~420 MB)."""
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    deep = a.root.joinpath(*[LEVEL] * DEPTH)
    deep.mkdir(parents=True)
    for n in range(FILES):
        (deep / f"{'f' * 100}{n:04d}").write_text(f"file {n}")
    a.run("init", "-q", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with small_disk(tmp_path / "tmp", "1m") as small_tmp, a.serving(port):
        b.env.update(TMPDIR=str(small_tmp), SQLITE_TMPDIR=str(small_tmp))
        result = b.run("join", "-q", token, str(b.root), check=False)
    assert result.returncode == 0, result.stderr
    received = b.root.joinpath(*[LEVEL] * DEPTH)
    assert sorted(p.read_text() for p in received.iterdir()) == sorted(
        f"file {n}" for n in range(FILES)
    )


def _catalog_of(path: Path, names: list[str]) -> Catalog:
    catalog = Catalog(sqlite_utils.Database(str(path)))
    delta = Delta()
    for name in names:
        version = Version(Kind.FILE, 10, 1, 0o644, os.urandom(32), os.urandom(8), 1)
        delta.added[make_key(name, new_version_id())] = version.encode()
    with catalog.conn:
        catalog.apply_delta(delta, os.urandom(32), 1)
    return catalog


def test_R42_a_plan_on_a_full_disk_stays_in_memory_or_says_the_disk_is_full(
    tmp_path: Path,
) -> None:
    """Held on the share's disk, a plan that fits its page cache never writes there (a
    full disk still plans its deletions and says what it lacks, window by window); one
    that does not is DiskFull, the error every full disk gets, not an internal error."""
    with small_disk(tmp_path / "disk", "256k") as disk:
        root = disk / "share"
        (root / ".backer").mkdir(parents=True)
        with contextlib.suppress(OSError), open(disk / "filler", "wb", buffering=0) as filler:
            while True:
                filler.write(b"\0" * 4096)
        small = _catalog_of(tmp_path / "small.db", [f"f{n}" for n in range(100)])
        with plan(small, root) as planned:
            assert planned.files == 100
        large = _catalog_of(tmp_path / "large.db", [f"{LEVEL}/{n:04d}" * 14 for n in range(600)])
        with pytest.raises(DiskFull, match=f"disk full: .* more needed in {root}"):
            plan(large, root)
        assert os.listdir(root / ".backer") == []  # (nothing of either plan stays)
