"""A running node whose share folder goes away (R15), or a second node on its home (R16)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path

from backer.config.identity import load_or_create_key
from backer.model.share import Share
from tests.e2e import Device, free_port, joined_pair, snapshot, wait_until


def test_r15_a_share_folder_moved_away_is_not_served_until_it_is_back(tmp_path: Path) -> None:
    a, b, (a_port, b_port) = joined_pair(tmp_path)
    for n in range(5):
        (a.root / f"f{n}.txt").write_text(f"file {n}\n")
    a_node, b_node = a.start(a_port), b.start(b_port)
    try:
        b.run("sync", a_node.address, "--dir", str(b.root), check=False)
        wait_until(lambda: (b.root / "f4.txt").exists(), [a_node, b_node])
        wait_until(lambda: " open (" in b_node.log, [a_node, b_node])
        events_before = len(json.loads(a.run("log", "--json", "--dir", str(a.root)).stdout))

        moved = tmp_path / "b-moved"
        b.root.rename(moved)
        b.root.mkdir()  # what the mount point of an unmounted disk looks like
        time.sleep(2)
        (a.root / "after-move.txt").write_text("written while b's folder is away\n")
        time.sleep(4)  # several root checks and dial attempts

        assert list(b.root.iterdir()) == []  # no .backer, no file written into it
        assert b_node.log.count("not served: the share folder") == 1
        assert sorted(snapshot(a.root)) == ["after-move.txt", *(f"f{n}.txt" for n in range(5))]
        events = json.loads(a.run("log", "--json", "--dir", str(a.root)).stdout)
        assert not [e for e in events[events_before:] if "deleted" in json.dumps(e).lower()]
        assert not (moved / "after-move.txt").exists()

        b.root.rmdir()
        moved.rename(b.root)
        b_node.wait_for("the share folder is back: served again")
        wait_until(lambda: (b.root / "after-move.txt").exists(), [a_node, b_node])
        (b.root / "from-b.txt").write_text("b records again\n")
        wait_until(lambda: (a.root / "from-b.txt").exists(), [a_node, b_node])
        assert sorted(snapshot(a.root)) == sorted(snapshot(b.root))
    finally:
        for device in (a, b):
            for node in list(device.nodes):
                node.stop()


def test_r16_a_second_run_on_the_same_home_exits_at_once_and_leaves_the_first_alone(
    tmp_path: Path,
) -> None:
    a = Device(tmp_path, "a")
    a.root.mkdir()
    a.run("init", str(a.root))
    first = a.start(api=f"127.0.0.1:{free_port()}")
    try:
        first.wait_for("web UI on")
        web = (a.home / "web").read_bytes()
        second = subprocess.run(  # (one that stays up, as it did, runs into the timeout)
            a.command("run", "--listen", f"127.0.0.1:{free_port()}", "--api", "off"),
            env=a.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 1, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert "already running" in lines[0] and f"pid {first.process.pid}" in lines[0]
        assert (a.home / "web").read_bytes() == web
        assert "http://127.0.0.1:" in a.run("open", "--no-browser").stdout
        assert first.process.poll() is None
        (a.root / "still.txt").write_text("the first node still records\n")
        first.wait_for("recorded 1 changes")
    finally:
        first.stop()


def _craft_event_out_of_range(device: Device) -> None:
    """What a member's modified client can record: a version dated 2^62 ms, which every
    other member rejects (and with it the session that carries it)."""
    share = Share.open(device.root, load_or_create_key(device.home), True, device.home)
    with share:
        _, version = next(iter(share.catalog.live_versions("readme.txt").items()))
        bad = dataclasses.replace(version, device=share.device[:8], time_ms=2**62, supersedes=())
        share.commit([("bad.txt", bad)])


def test_r7_sessions_closed_on_rejected_events_back_off_and_status_says_why(
    tmp_path: Path,
) -> None:
    a, b, (a_port, b_port) = joined_pair(tmp_path)
    (a.root / "readme.txt").write_text("hello\n")
    with a.serving(a_port) as address:
        b.sync(address)
    _craft_event_out_of_range(b)
    a_node, b_node = a.start(a_port), b.start(b_port)
    try:
        a_node.wait_for(" open (")
        time.sleep(20)
        sessions = sum(" open (" in line for line in a_node.lines)
        assert sessions <= 9, a_node.log  # ~0.85 per second without a backoff
        devices = json.loads(a.run("status", "--json", "--dir", str(a.root)).stdout)["devices"]
        (other,) = [d for d in devices if not d["this"]]
        assert other["last_error"], other
        said = a.run("status", "--dir", str(a.root)).stdout
        assert "its last session failed: " in said, said
    finally:
        a_node.stop()
        b_node.stop()


def test_r11_last_seen_of_an_offline_device_is_when_its_session_ended(tmp_path: Path) -> None:
    a, b, (a_port, b_port) = joined_pair(tmp_path)
    a_node, b_node = a.start(a_port), b.start(b_port)
    try:
        b_node.wait_for(" open (")
        time.sleep(4)  # the session lasts a while
        ended_ms = time.time_ns() // 1_000_000
        assert b_node.stop() == 0
    finally:
        a_node.stop()
        b_node.stop()
    devices = json.loads(b.run("status", "--json", "--dir", str(b.root)).stdout)["devices"]
    (other,) = [d for d in devices if not d["this"]]
    assert other["last_seen_ms"] >= ended_ms - 500, (other, ended_ms)
