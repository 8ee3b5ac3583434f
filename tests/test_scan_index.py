"""A scan in a running node pushes its new versions before it writes their chunk index:
a peer's chunk request waits for the index, and a node that dies in between loses
nothing (its next scan hashes the file again and indexes it, recording nothing twice)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backer.model.share import Share
from backer.protocol.session import Session
from backer.protocol.wire import Chunks, WantChunks
from backer.scanner.chunks import ChunkStore
from backer.scanner.content import ChunkRef, manifest_of_bytes
from tests.e2e import Device
from tests.helpers import make_devices, syncing

REPO = Path(__file__).resolve().parent.parent

SIZE = 4 * 1024 * 1024


class Died(Exception):
    """The node stops right after pushing (a SIGKILL, as far as the database knows)."""


def _inserted(share: Share, name: str) -> tuple[bytes, list[ChunkRef]]:
    """``name`` recorded, then 10 bytes inserted in its middle (renamed in): the new
    bytes and the chunks of them that the old version did not have."""
    old = os.urandom(SIZE)
    (share.root / name).write_bytes(old)
    share.scan()
    new = old[: SIZE // 2] + os.urandom(10) + old[SIZE // 2 :]
    staged = share.root.parent / f"{name}.new"
    staged.write_bytes(new)
    hour_ago = time.time_ns() - 3600 * 10**9  # a settled mtime: trusted by the next scan
    os.utime(staged, ns=(hour_ago, hour_ago))
    os.replace(staged, share.root / name)
    held = {ref.hash for ref in manifest_of_bytes(old).chunks}
    fresh = [ref for ref in manifest_of_bytes(new).chunks if ref.hash not in held]
    assert fresh
    return new, fresh


def _bytes_of(share: Share, ref: ChunkRef) -> bytes | None:
    return ChunkStore(share.root, share.catalog).read(ref.hash)


def test_a_chunk_request_during_the_index_waits_and_gets_the_new_bytes(tmp_path: Path) -> None:
    (share,) = make_devices(tmp_path, 1)
    new, fresh = _inserted(share, "large.bin")
    peer = syncing(Session(share, "peer"))
    wanted = fresh[0]
    held_back = []

    def pushed() -> None:  # the versions are in the journal; the index is not written
        assert _bytes_of(share, wanted) is None
        peer.receive(WantChunks([wanted.hash]))
        held_back.extend(peer.take_outbox())
        assert not peer.backlog  # (the transport would otherwise wait on it in a loop)

    summary = asyncio.run(share.scan_off_loop(["large.bin"], recorded=pushed))
    assert summary.modified == ["large.bin"]
    assert not any(isinstance(m, Chunks) for m in held_back)  # not answered "missing"
    (answer,) = [m for m in peer.take_outbox() if isinstance(m, Chunks)]
    assert answer.hashes == [wanted.hash]
    assert bytes(answer.data[0]) == new[wanted.offset : wanted.offset + wanted.length]
    entry = share.catalog.local_entries(["large.bin"])["large.bin"]
    assert entry.settled


def test_a_node_dead_between_its_push_and_its_index_indexes_on_its_next_scan(
    tmp_path: Path,
) -> None:
    (share,) = make_devices(tmp_path, 1)
    new, fresh = _inserted(share, "large.bin")

    def die() -> None:
        raise Died

    with pytest.raises(Died):
        asyncio.run(share.scan_off_loop(["large.bin"], recorded=die))
    (pushed,) = share.catalog.live_versions("large.bin")
    assert all(_bytes_of(share, ref) is None for ref in fresh)
    root, key = share.root, share.key
    share.close()

    with Share.open(root, key) as again:
        summary = again.scan()
        assert summary.events == 0  # recorded once, by the scan that died
        assert list(again.catalog.live_versions("large.bin")) == [pushed]
        for ref in fresh:
            assert _bytes_of(again, ref) == new[ref.offset : ref.offset + ref.length]
        assert again.catalog.local_entries(["large.bin"])["large.bin"].settled


_DIE_AT_PUSH = """
import asyncio, os, signal, sys
from pathlib import Path
from backer.config.identity import load_or_create_key
from backer.model.share import Share
share = Share.open(Path(sys.argv[1]), load_or_create_key(Path(os.environ["BACKER_HOME"])))
asyncio.run(share.scan_off_loop(recorded=lambda: os.kill(os.getpid(), signal.SIGKILL)))
"""


def _one_edited_one_deleted(
    tmp_path: Path,
) -> tuple[Device, dict[str, bytes], dict[str, dict[str, object]]]:
    """A share whose files ``edited`` (replaced as an editor saves: a new inode) and
    ``deleted`` changed since its init, not scanned yet: their first bytes and their
    first versions as ``history --json`` gave them."""
    device = Device(tmp_path, "a")
    device.root.mkdir()
    old = {name: os.urandom(300_000) for name in ("edited", "deleted")}
    for name, data in old.items():
        (device.root / name).write_bytes(data)
    device.run("init", str(device.root), "-q")
    versions = {
        name: json.loads(device.run("history", str(device.root / name), "--json").stdout)[0]
        for name in old
    }
    staged = tmp_path / "edited.new"  # replaced, as an editor saves: a new inode
    staged.write_bytes(os.urandom(300_000))
    os.replace(staged, device.root / "edited")
    (device.root / "deleted").unlink()
    return device, old, versions


def test_R39_a_node_killed_between_its_push_and_its_index_keeps_the_replaced_versions(
    tmp_path: Path,
) -> None:
    """A node SIGKILLed once a scan's versions were pushed, before the chunk index was
    written: the replaced and deleted contents' bytes were in the store, history said
    so, and no restore (nor a peer) could read them, for good: their chunk locations
    were noted only in the index steps that never ran."""
    device, old, versions = _one_edited_one_deleted(tmp_path)
    died = subprocess.run(
        [sys.executable, "-c", _DIE_AT_PUSH, str(device.root)], env=device.env, cwd=REPO
    )
    assert died.returncode == -signal.SIGKILL
    device.run("scan", "--dir", str(device.root), "-q")
    for name, data in old.items():
        version = versions[name]["version"]
        target = tmp_path / f"{name}.restored"
        device.run("restore", str(device.root / name), "--version", version, "--to", str(target))
        assert target.read_bytes() == data


_DIE_AFTER_RECORDING = """
import os, signal, sys
from pathlib import Path
from backer.config.identity import load_or_create_key
from backer.db.catalog import Catalog
from backer.model.share import Share
share = Share.open(Path(sys.argv[1]), load_or_create_key(Path(os.environ["BACKER_HOME"])))
set_meta = Catalog.set_meta
def die_at(catalog, key, value):
    if key == sys.argv[2]:
        os.kill(os.getpid(), signal.SIGKILL)
    set_meta(catalog, key, value)
Catalog.set_meta = die_at
share.scan()
"""


@pytest.mark.parametrize("dies_at", ["catalog_position", "last_scan_ms"])
def test_R40_a_scan_killed_once_its_versions_are_recorded_records_nothing_twice(
    tmp_path: Path, dies_at: str
) -> None:
    """A scan killed once its journal events were stored, before the catalog took them
    in (``catalog_position``) or before the transaction that wrote its scan cache
    (``last_scan_ms``): the next scan found every change still unrecorded and recorded
    it again, beside the first (one conflict per edited file, on every device)."""
    device = Device(tmp_path, "a")
    device.root.mkdir()
    names = [f"f{n}" for n in range(5)]
    for name in names:
        (device.root / name).write_bytes(os.urandom(1000))
    device.run("init", str(device.root), "-q")
    for name in names[:3]:  # edited, as an editor saves; the rest deleted
        staged = tmp_path / "new"
        staged.write_bytes(os.urandom(1000))
        os.replace(staged, device.root / name)
    for name in names[3:]:
        (device.root / name).unlink()
    script = [sys.executable, "-c", _DIE_AFTER_RECORDING, str(device.root), dies_at]
    died = subprocess.run(script, env=device.env, cwd=REPO)
    assert died.returncode == -signal.SIGKILL
    device.run("scan", "--dir", str(device.root), "-q")
    assert json.loads(device.run("conflicts", "--dir", str(device.root), "--json").stdout) == []
    for name in names:
        history = json.loads(device.run("history", str(device.root / name), "--json").stdout)
        assert [v["live"] for v in history] == [False, True], name


def test_a_scan_killed_once_its_versions_are_recorded_keeps_the_replaced_versions_readable(
    tmp_path: Path,
) -> None:
    """A scan killed after the transaction of its events and scan cache, before the
    one that noted the replaced and deleted contents to register at their store
    entries (``last_scan_ms`` is written there): the cache no longer named the old
    versions, so no later scan noted them, and their kept bytes were in the store
    where no read found them (a restore said they were not on this device)."""
    device, old, versions = _one_edited_one_deleted(tmp_path)
    script = [sys.executable, "-c", _DIE_AFTER_RECORDING, str(device.root), "last_scan_ms"]
    died = subprocess.run(script, env=device.env, cwd=REPO)
    assert died.returncode == -signal.SIGKILL
    device.run("scan", "--dir", str(device.root), "-q")
    for name, data in old.items():
        version = versions[name]["version"]
        target = tmp_path / f"{name}.restored"
        device.run("restore", str(device.root / name), "--version", version, "--to", str(target))
        assert target.read_bytes() == data


def test_a_peers_request_is_handled_whole_between_two_steps_of_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer asks for the new manifests as soon as the versions are pushed, while the
    index is being written: handling a request takes the loop several turns (read,
    decrypt, answer, send), and with one turn between two steps it was answered only
    after several steps (B waited 0.4-0.8 s for the manifests after a 10-byte insert
    into four 256 MiB files). A pause between steps lets the whole request through."""
    monkeypatch.setattr("backer.model.share.INDEX_STEP_ROWS", 1)  # a step per file
    (share,) = make_devices(tmp_path, 1)
    names = [f"file-{n}.bin" for n in range(6)]
    for name in names:
        (share.root / name).write_bytes(os.urandom(64 * 1024))
    share.scan()
    for name in names:  # changed, with a settled mtime (the next scan trusts it)
        (share.root / name).write_bytes(os.urandom(64 * 1024))
        hour_ago = time.time_ns() - 3600 * 10**9
        os.utime(share.root / name, ns=(hour_ago, hour_ago))
    steps_of = Share._index_steps
    done: list[int] = []
    answered: list[int] = []

    def counted(self: Share, indexing: object) -> object:
        for step in steps_of(self, indexing):  # type: ignore[arg-type]
            yield lambda step=step: (step(), done.append(1))

    monkeypatch.setattr(Share, "_index_steps", counted)

    async def request() -> None:  # a request that needs four turns of the loop
        for _ in range(4):
            await asyncio.sleep(0)
        answered.append(len(done))

    async def scan() -> None:
        tasks = []
        summary = await share.scan_off_loop(
            names, recorded=lambda: tasks.append(asyncio.ensure_future(request()))
        )
        await asyncio.gather(*tasks)
        assert sorted(summary.modified) == names

    asyncio.run(scan())
    assert len(done) >= 6
    assert answered and answered[0] <= 1, f"answered after {answered[0]} of {len(done)} steps"
