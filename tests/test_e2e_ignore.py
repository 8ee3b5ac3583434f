"""Ignore rules only ever stop syncing: three devices through the real CLI over TCP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e import Device, free_port, invite, snapshot

LOGS = {f"logs/{n:02}.log": f"log line {n}\n".encode() for n in range(20)}


@pytest.fixture
def trio(tmp_path: Path):
    a, b, c = (Device(tmp_path, name) for name in "abc")
    (a.root / "logs").mkdir(parents=True)
    for path, data in LOGS.items():
        (a.root / path).write_bytes(data)
    (a.root / "notes.txt").write_text("keep me\n")
    a.run("init", str(a.root))
    port = free_port()
    tokens = [invite(a, f"127.0.0.1:{port}") for _ in range(2)]
    with a.serving(port) as address:
        b.run("join", tokens[0], str(b.root))
        c.run("join", tokens[1], str(c.root))
        b.sync(address)  # b learns of c's admission
        yield a, b, c, address


def converge(devices: list[Device], address: str, rounds: int = 2) -> None:
    for _ in range(rounds):
        for device in devices[1:]:
            device.sync(address)


def deletions(device: Device) -> list[str]:
    events = json.loads(device.run("log", "--json", "--dir", str(device.root)).stdout)
    return [c["path"] for e in events for c in e["changes"] if c["change"] == "deleted"]


def logs_on(device: Device) -> dict[str, bytes]:
    return {p: (device.root / p).read_bytes() for p in LOGS if (device.root / p).exists()}


def test_backerignore_added_on_one_device_deletes_nothing_on_three(trio) -> None:
    a, b, c, address = trio
    assert all(logs_on(d) == LOGS for d in (a, b, c))
    (b.root / ".backerignore").write_text("*.log\n")
    b.run("scan", "--dir", str(b.root))
    converge([a, b, c], address)
    for device in (a, b, c):
        assert (device.root / ".backerignore").read_text() == "*.log\n"
        assert logs_on(device) == LOGS, device.root
        assert deletions(device) == []
    # now ignored everywhere: an edit on one device stays there, a new file stays there
    (c.root / "logs" / "03.log").write_text("c's own log\n")
    (a.root / "fresh.log").write_text("only on a\n")
    converge([a, b, c], address)
    assert (a.root / "logs" / "03.log").read_bytes() == LOGS["logs/03.log"]
    assert (c.root / "logs" / "03.log").read_text() == "c's own log\n"
    assert not (b.root / "fresh.log").exists() and not (c.root / "fresh.log").exists()
    assert deletions(a) == deletions(b) == deletions(c) == []


def test_a_device_never_writes_a_path_its_own_rules_ignore(trio) -> None:
    a, b, _, address = trio
    (b.root / ".backerignore").write_text("*.secret\n")  # not yet known to a
    (a.root / "plans.secret").write_text("a's, written before it learns b's rule\n")
    b.sync(address)
    assert not (b.root / "plans.secret").exists()
    assert (a.root / "plans.secret").exists()  # and a, once it has the rule, keeps its copy
    assert (a.root / ".backerignore").read_text() == "*.secret\n"


def test_unignoring_picks_files_up_again_without_new_versions(trio) -> None:
    a, b, c, address = trio
    (a.root / ".backerignore").write_text("logs/\n")  # a (serving) scans when b connects
    converge([a, b, c], address)
    (b.root / "logs" / "07.log").write_text("b edited it while ignored\n")
    (a.root / ".backerignore").write_text("")
    converge([a, b, c], address, rounds=3)
    out = a.run("history", str(a.root / "logs/00.log"), "--json", "--dir", str(a.root)).stdout
    history = json.loads(out)
    assert len(history) == 1  # identical on every device: picked up, not recorded again
    trees = [snapshot(d.root) for d in (a, b, c)]
    assert trees[0] == trees[1] == trees[2]
    kept = [v[1] for p, v in trees[0].items() if p.startswith("logs/07")]
    assert kept == [b"b edited it while ignored\n"]  # b's edit of the version it held: no
    out = a.run("history", str(a.root / "logs/07.log"), "--json", "--dir", str(a.root)).stdout
    assert len(json.loads(out)) == 2  # conflict, and the old version is in the history
    assert deletions(a) == []
