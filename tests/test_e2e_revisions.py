"""Revisions end to end, three devices as real CLI processes: restore, time travel,
conflicts resolved on one device and gone on all."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time

from tests import test_e2e_sync
from tests.e2e import Device, snapshot, summary_number

trio = test_e2e_sync.trio  # a serving, b and c joined: the same three devices
converge = test_e2e_sync.converge


def _at(device: Device, path: str) -> str:
    return str(device.root / path)


def _run(device: Device, *args: str, check: bool = True):
    return device.run(*args, "--dir", str(device.root), check=check)


def _history(device: Device, path: str) -> list[dict]:
    return json.loads(_run(device, "history", _at(device, path), "--json").stdout)


def _status(device: Device) -> dict:
    return json.loads(device.run("status", "--json", "--dir", str(device.root)).stdout)


def _conflicts(device: Device) -> list[dict]:
    return json.loads(device.run("conflicts", "--json", "--dir", str(device.root)).stdout)


def _now_text() -> str:
    """This second as --at takes it, once it is over (versions recorded in it are in)."""
    stamp = dt.datetime.now(tz=dt.UTC)
    time.sleep(1.05)
    return stamp.strftime("%Y-%m-%d %H:%M:%S")


def test_a_file_edited_five_times_and_deleted_comes_back_at_version_2_everywhere(trio) -> None:
    a, b, c, address = trio
    contents = [f"version {n}\n".encode() * 2000 for n in range(1, 6)]
    for content in contents:  # written on a (its node records them), mirrored at once
        (a.root / "report.txt").write_bytes(content)
        a.run("scan", "--dir", str(a.root))
        converge([a, b, c], address, rounds=1)
    (a.root / "report.txt").unlink()
    a.run("scan", "--dir", str(a.root))
    converge([a, b, c], address, rounds=1)
    assert not (c.root / "report.txt").exists()
    versions = _history(c, "report.txt")
    assert [v["kind"] for v in versions] == ["file"] * 5 + ["deleted"]
    second = versions[1]["version"]
    out = _run(c, "restore", _at(c, "report.txt"), "--version", second).stdout
    assert f"restored report.txt to version {second}" in out
    converge([a, b, c], address, rounds=2)
    for device in (a, b, c):
        assert (device.root / "report.txt").read_bytes() == contents[1]
        history = _history(device, "report.txt")
        assert [v["version"] for v in history[:6]] == [v["version"] for v in versions]
        assert len(history) == 7 and history[6]["live"]  # five written, deleted, restored
        assert history[6]["hash"] == versions[1]["hash"]
        assert history[6]["supersedes"] == [versions[5]["version"]]  # the deletion
    assert snapshot(a.root) == snapshot(b.root) == snapshot(c.root)


def test_the_device_that_made_the_edit_restores_bytes_only_a_peer_holds(trio) -> None:
    a, b, _, address = trio
    (b.root / "plan.txt").write_bytes(b"the first plan\n" * 3000)
    b.sync(address)  # a (its node) writes it
    (b.root / "plan.txt").write_bytes(b"a second plan\n" * 3000)
    b.sync(address)  # a keeps the first plan's bytes as it replaces them
    shutil.rmtree(b.root / ".backer" / "versions", ignore_errors=True)  # none kept here
    first = _history(b, "plan.txt")[0]["version"]
    refused = _run(b, "restore", _at(b, "plan.txt"), "--version", first, check=False)
    assert refused.returncode == 1, refused.stderr
    assert "are not on this device: give --from" in refused.stderr
    assert (b.root / "plan.txt").read_bytes() == b"a second plan\n" * 3000
    out = _run(b, "restore", _at(b, "plan.txt"), "--version", first, "--from", address).stdout
    assert f"restored plan.txt to version {first}" in out
    assert (b.root / "plan.txt").read_bytes() == b"the first plan\n" * 3000
    b.sync(address)
    assert (a.root / "plan.txt").read_bytes() == b"the first plan\n" * 3000

    second = _history(b, "plan.txt")[1]["version"]  # now kept by a only, as it was replaced
    shutil.rmtree(b.root / ".backer" / "versions", ignore_errors=True)
    node = b.start()  # b's node fetches it from the devices it is connected to
    try:
        node.wait_for(" open (")
        out = _run(b, "restore", _at(b, "plan.txt"), "--version", second).stdout
        assert f"restored plan.txt to version {second}" in out
        assert (b.root / "plan.txt").read_bytes() == b"a second plan\n" * 3000
    finally:
        node.stop()

    (b.root / "lost.txt").write_bytes(b"recorded, then overwritten before any sync\n" * 100)
    b.run("scan", "--dir", str(b.root))
    (b.root / "lost.txt").write_bytes(b"what is left\n")
    b.sync(address)
    lost = _history(b, "lost.txt")[0]["version"]
    nobody = _run(
        b, "restore", _at(b, "lost.txt"), "--version", lost, "--from", address, check=False
    )
    assert nobody.returncode == 1
    assert nobody.stderr.count("\n") == 1 and "are on no reachable device" in nobody.stderr
    assert (b.root / "lost.txt").read_bytes() == b"what is left\n"


def test_restoring_a_folder_after_a_bulk_delete_of_1000_files_sends_no_file_bytes(trio) -> None:
    a, b, c, address = trio
    (a.root / "bulk").mkdir()
    for n in range(1000):
        (a.root / "bulk" / f"{n:04}.dat").write_bytes(os.urandom(8000))
    a.run("scan", "--dir", str(a.root))
    converge([a, b, c], address, rounds=1)
    before = snapshot(c.root)
    moment = _now_text()
    shutil.rmtree(a.root / "bulk")
    a.run("scan", "--dir", str(a.root))
    converge([a, b, c], address, rounds=1)
    (b.root / "bulk").mkdir()
    (b.root / "bulk" / "made-since.txt").write_text("created after the moment")
    b.run("scan", "--dir", str(b.root))
    listed = json.loads(_run(b, "ls", _at(b, "bulk"), "--at", moment, "--json").stdout)
    assert len(listed) == 1000 and listed[0]["path"] == "bulk/0000.dat"
    out = _run(b, "restore", _at(b, "bulk"), "--at", moment).stdout
    assert "(1000 written, 1 deleted)" in out, out  # (bulk/ was made again)
    assert snapshot(b.root) == before
    pushed = b.sync(address)  # a, which deleted them itself, may fetch them from b
    assert summary_number(pushed, "chunk bytes received") == 0, pushed
    synced = c.sync(address)  # c kept every chunk when it applied the deletion
    assert summary_number(synced, "files written") == 1000, synced
    assert summary_number(synced, "chunk bytes received") == 0, synced
    wire = summary_number(synced, "wire bytes received") + summary_number(synced, "sent", True)
    assert 0 < wire < 1000 * 8000 // 10, synced  # metadata of 1,000 versions, no contents
    converge([a, b, c], address, rounds=1)
    assert snapshot(a.root) == snapshot(c.root) == before
    undo = _run(b, "restore", _at(b, "bulk"), "--at", _now_text())
    assert "nothing to restore" in undo.stdout


def test_a_conflict_resolved_on_one_device_is_gone_on_all(trio) -> None:
    a, b, c, address = trio
    (b.root / "docs" / "readme.txt").write_text("b's version\n")
    (c.root / "docs" / "readme.txt").write_text("c's longer version\n")
    converge([a, b, c], address, rounds=2)
    for device in (a, b, c):
        assert len(list((device.root / "docs").glob("readme.sync-conflict-*"))) == 1
        assert _status(device)["conflicts"] == 1
    (conflict,) = _conflicts(b)
    assert conflict["path"] == "docs/readme.txt"
    held, copied = conflict["versions"]
    assert held["copy"] is None and copied["copy"].startswith("docs/readme.sync-conflict-")
    assert {held["size"], copied["size"]} == {len("b's version\n"), len("c's longer version\n")}
    loser_text = (a.root / copied["copy"]).read_text()
    out = _run(a, "resolve", _at(a, "docs/readme.txt"), "--keep", copied["version"])
    assert f"kept version {copied['version']}, 1 copies removed" in out.stdout  # by a's node
    converge([a, b, c], address, rounds=2)
    for device in (a, b, c):
        assert (device.root / "docs" / "readme.txt").read_text() == loser_text
        assert not list((device.root / "docs").glob("readme.sync-conflict-*"))
        assert _status(device)["conflicts"] == 0 and _conflicts(device) == []
        hashes = {v["hash"] for v in _history(device, "docs/readme.txt")}
        assert {held["hash"], copied["hash"]} <= hashes  # the loser stays in history
    assert snapshot(a.root) == snapshot(b.root) == snapshot(c.root)


def test_conflicts_show_when_each_file_was_modified_which_keep_newest_goes_by(trio) -> None:
    """'backer conflicts' showed when each version was recorded, while --keep-newest
    keeps the one modified last: an edit made while its node was stopped is recorded at
    the node's next start, so the listing named as newest the version it did not keep."""
    a, b, c, address = trio
    older = b.root / "docs" / "readme.txt"
    older.write_text("b's version, saved long ago\n")
    long_ago = dt.datetime(2020, 1, 2, 3, 4, 5, tzinfo=dt.UTC).timestamp()
    os.utime(older, (long_ago, long_ago))
    (c.root / "docs" / "readme.txt").write_text("c's version\n")
    converge([a, b, c], address, rounds=2)
    listed = _run(a, "conflicts").stdout
    assert "modified 2020-01-02 03:04:05" in listed, listed
    (conflict,) = _conflicts(a)
    modified = {v["modified"] for v in conflict["versions"]}
    assert "2020-01-02 03:04:05" in modified and len(modified) == 2, conflict
    _run(a, "resolve", _at(a, "docs/readme.txt"), "--keep-newest")
    assert (a.root / "docs" / "readme.txt").read_text() == "c's version\n"


def test_bad_revision_requests_are_one_line_and_fail(trio) -> None:
    _, b, _, _ = trio
    readme = _at(b, "docs/readme.txt")
    for args, said in (
        (("restore", readme, "--version", "AAAAAAAAAAAA"), "no version AAAAAAAAAAAA"),
        (("restore", readme, "--at", "2001-01-01"), "the share did not exist yet"),
        (("ls", _at(b, "docs"), "--at", "2001-01-01"), "the share did not exist yet"),
        (("restore", "/etc/passwd", "--at", "1h"), "is not inside the share"),
        (("restore", readme), "give either --version or --at"),
        (("resolve", readme, "--keep-newest"), "no conflict at 'docs/readme.txt'"),
        (("resolve", readme), "give one of --keep VERSION"),
    ):
        result = _run(b, *args, check=False)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and said in result.stderr, (args, result.stderr)
