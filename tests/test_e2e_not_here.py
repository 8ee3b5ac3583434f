"""What a device lacks is said, never left silent: a join or a one-shot sync that could
not get a listed file's content names it and exits 3; ``status`` names it while it is
not here. The inviter is the test's member (tests/hostile_member.py) speaking the real
protocol honestly; it lists a file whose content it does not hold (as when the only
holder is offline). The node's web API says it too."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

from simulations.hostile import Hostile
from tests.e2e import Device, free_port, invite
from tests.hostile_member import HostileMember, Tactic
from tests.test_e2e_api import start


def run(device: Device, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        device.command(*args),
        env={**device.env, "BACKER_TIME_SCALE": "0.1"},
        capture_output=True,
        text=True,
        timeout=90,
    )


@contextlib.contextmanager
def listing_what_it_lacks(tmp_path: Path) -> Iterator[tuple[Device, str, int]]:
    """An inviter serving on a port, whose share holds "f" and lists "g" with a content
    nobody holds: (a device that may join, its invite, the port)."""
    inviter, joiner = Device(tmp_path, "inviter"), Device(tmp_path, "joiner")
    inviter.root.mkdir()
    (inviter.root / "f").write_bytes(b"here")
    inviter.run("init", str(inviter.root))
    port = free_port()
    token = invite(inviter, f"127.0.0.1:{port}")
    with HostileMember(inviter.root, inviter.home, Tactic()).running(port) as member:
        assert member.share is not None
        share = member.share
        lister = Hostile(0, share.device)  # records "g" with a content id nobody holds
        member.call(lambda: lister.craft(share, "unknown_content", 0, [share.device]))
        yield joiner, token, port


def test_a_join_and_a_sync_name_a_listed_file_nobody_reachable_holds_and_exit_3(
    tmp_path: Path,
) -> None:
    with listing_what_it_lacks(tmp_path) as (joiner, token, port):
        joined = run(joiner, "join", token, str(joiner.root))
        assert joined.returncode == 3, joined.stderr
        assert "error: g: not here: no device reached had their content" in joined.stderr
        assert "1 files (1 bytes) the share lists are not here" in joined.stderr
        assert "errors 0; not here 1;" in joined.stdout
        assert (joiner.root / "f").read_bytes() == b"here"
        assert not (joiner.root / "g").exists()

        synced = run(joiner, "sync", "--json", f"127.0.0.1:{port}", "--dir", str(joiner.root))
        assert synced.returncode == 3, synced.stderr
        missing = json.loads(synced.stdout)["not_here"]
        assert (missing["files"], missing["bytes"], missing["paths"]) == (1, 1, ["g"])

    status = run(joiner, "status", "--dir", str(joiner.root))
    assert status.returncode == 0, status.stderr
    assert "not here  1 files, 1 bytes the share lists\n  g\n" in status.stdout
    assert "(this device; needs 1 files, 1 bytes)" in status.stdout
    report = json.loads(run(joiner, "status", "--json", "--dir", str(joiner.root)).stdout)
    assert report["not_here"] == {"files": 1, "bytes": 1, "paths": ["g"]}
    this = next(d for d in report["devices"] if d["this"])
    assert (this["need_files"], this["need_bytes"]) == (1, 1)

    node, api = start(joiner)
    try:
        status_code, shares, _ = api.call("GET", "/api/shares")
    finally:
        node.stop()
    assert status_code == 200, shares
    assert shares[0]["not_here"] == {"files": 1, "bytes": 1, "paths": ["g"]}
