"""A scan in a running node pushes its new versions before it writes their chunk index:
a peer's chunk request waits for the index, and a node that dies in between loses
nothing (its next scan hashes the file again and indexes it, recording nothing twice)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from backer.model.share import Share
from backer.protocol.session import Session
from backer.protocol.wire import Chunk, WantChunks
from backer.scanner.chunks import ChunkStore
from backer.scanner.content import ChunkRef, manifest_of_bytes
from tests.helpers import make_devices, syncing

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
    assert not any(isinstance(m, Chunk) for m in held_back)  # not answered "missing"
    (answer,) = [m for m in peer.take_outbox() if isinstance(m, Chunk)]
    assert bytes(answer.data) == new[wanted.offset : wanted.offset + wanted.length]
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
