"""Directory modification times through the real CLI: kept on the peer after its
entries are written, and never taken for a change of the peer's own."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.e2e import Device, free_port, invite, snapshot, summary_number

DIRS = ["photos", "photos/2019", "empty"]


def _mtimes(root: Path) -> list[int]:
    return [(root / name).lstat().st_mtime_ns for name in DIRS]


def test_directory_mtimes_reach_a_peer_and_its_scan_records_nothing(tmp_path: Path) -> None:
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    for name in DIRS:
        (a.root / name).mkdir(parents=True)
    (a.root / "photos" / "2019" / "beach.jpg").write_bytes(os.urandom(50_000))
    (a.root / "photos" / "index.txt").write_text("one photo\n")
    for n, name in enumerate(reversed(DIRS)):
        os.utime(a.root / name, ns=(1_500_000_000_000_000_000 + n * 10**9,) * 2)
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with a.serving(port) as address:
        b.run("join", token, str(b.root))
        assert _mtimes(b.root) == _mtimes(a.root)
        (a.root / "photos" / "2019" / "sunset.jpg").write_bytes(os.urandom(30_000))
        os.utime(a.root / "photos" / "2019", ns=(1_600_000_000_000_000_000,) * 2)
        out = b.sync(address)  # serve scans a when b connects
        assert summary_number(out, "files written") >= 1, out
        assert snapshot(b.root) == snapshot(a.root)
        assert _mtimes(b.root) == _mtimes(a.root)
        scanned = json.loads(b.run("scan", "--json", "--dir", str(b.root)).stdout)
        assert scanned["added"] == scanned["modified"] == scanned["deleted"] == []
        again = b.sync(address)
        assert summary_number(again, "events received") == 0
    assert _mtimes(b.root) == _mtimes(a.root)
