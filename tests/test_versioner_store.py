"""The content store: replaced and deleted contents kept once each, by content id, on
the device that applied the change and on the one that made it."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from backer.model.share import DB_FILE, Share
from backer.scanner.chunks import ChunkStore
from backer.scanner.content import manifest_of_bytes
from backer.versioner.store import Store, entry_name, held_bytes
from simulations.faults import link_without_hard_links
from tests.helpers import make_devices, sync, tree


def kept(share: Share) -> dict[bytes, bytes]:
    """Every entry of the share's store: content id -> bytes (read from disk)."""
    root = share.root / ".backer" / "store"
    return {bytes.fromhex(p.name): p.read_bytes() for p in root.glob("*/*")}


def store_blocks(share: Share) -> int:
    """Disk the store costs beyond the share's files: entries no share file links."""
    root = share.root / ".backer" / "store"
    return sum(p.lstat().st_blocks * 512 for p in root.glob("*/*") if p.lstat().st_nlink == 1)


def cid(data: bytes) -> bytes:
    return manifest_of_bytes(data).id


def test_replaced_and_deleted_contents_are_kept_in_the_store(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    (a.root / "doc.txt").write_text("first")
    (a.root / "gone.txt").write_text("bye")
    sync(a, b)
    (a.root / "doc.txt").write_text("second")
    (a.root / "gone.txt").unlink()
    sync(a, b)
    assert kept(b)[cid(b"first")] == b"first" and kept(b)[cid(b"bye")] == b"bye"
    assert held_bytes(b.root, b.catalog, cid(b"first")) == b"first"
    assert held_bytes(b.root, b.catalog, cid(b"bye")) == b"bye"
    assert held_bytes(b.root, b.catalog, cid(b"never written")) is None


def test_a_replaced_file_with_a_255_byte_name_is_kept(tmp_path: Path) -> None:
    """``name~STAMP`` exceeded NAME_MAX: the replacement failed on every sync (entries
    are now named by content, whatever the file's name)."""
    a, b = make_devices(tmp_path, 2)
    name = "é" * 100 + "x" * 55  # 255 bytes in UTF-8
    (a.root / name).write_text("first")
    sync(a, b)
    (a.root / name).write_text("second")
    _, right = sync(a, b)
    assert tree(a.root) == tree(b.root)
    assert not [r.errors for r in right.replicator.reports if r.errors]
    assert kept(b)[cid(b"first")] == b"first"


def test_the_device_that_edits_or_deletes_keeps_the_old_contents(tmp_path: Path) -> None:
    """Only the devices applying a remote change kept the old contents; the one where
    the edit happened kept nothing."""
    (a,) = make_devices(tmp_path, 1)
    (a.root / "report.txt").write_bytes(b"draft one")
    (a.root / "notes.txt").write_bytes(b"to be deleted")
    a.scan()
    new = a.root / "report.txt.new"  # an editor's save: a new file renamed over the old
    new.write_bytes(b"draft two")
    new.replace(a.root / "report.txt")
    (a.root / "notes.txt").unlink()
    a.scan()
    assert held_bytes(a.root, a.catalog, cid(b"draft one")) == b"draft one"
    assert held_bytes(a.root, a.catalog, cid(b"to be deleted")) == b"to be deleted"
    assert store_blocks(a) > 0  # their only copies now


def test_an_edit_in_place_drops_the_kept_bytes_it_overwrote(tmp_path: Path) -> None:
    """A hard link shares the inode: rewritten in place, the old bytes are gone, and the
    store must not claim them."""
    (a,) = make_devices(tmp_path, 1)
    (a.root / "log.txt").write_bytes(b"line one\n")
    a.scan()
    assert Store(a.root, a.catalog).has(cid(b"line one\n"))
    with open(a.root / "log.txt", "r+b") as handle:
        handle.write(b"LINE ONE\n")
    a.scan()
    assert not Store(a.root, a.catalog).has(cid(b"line one\n"))
    assert held_bytes(a.root, a.catalog, cid(b"line one\n")) is None
    assert held_bytes(a.root, a.catalog, cid(b"LINE ONE\n")) == b"LINE ONE\n"


def test_identical_contents_and_renames_cost_nothing_twice(tmp_path: Path) -> None:
    a, b = make_devices(tmp_path, 2)
    data = os.urandom(400_000)
    for name in ("one.bin", "two.bin", "three.bin"):
        (a.root / name).write_bytes(data)
    sync(a, b)
    (a.root / "one.bin").rename(a.root / "renamed.bin")
    (a.root / "two.bin").unlink()
    sync(a, b)
    for share in (a, b):
        assert list(kept(share)) == [cid(data)]
        assert store_blocks(share) == 0  # a share file still holds the bytes
    (a.root / "three.bin").unlink()
    (a.root / "renamed.bin").unlink()
    sync(a, b)
    for share in (a, b):
        assert kept(share) == {cid(data): data}
        assert 400_000 <= store_blocks(share) < 2 * 400_000  # one copy


def test_identical_bytes_rewritten_by_a_peer_leave_one_copy(tmp_path: Path) -> None:
    """A version with the same content as the one on disk (a re-recorded share) is
    written as a new file: the store must then hold the new inode, not keep the old."""
    a, b = make_devices(tmp_path, 2)
    data = os.urandom(300_000)
    (a.root / "big.bin").write_bytes(data)
    sync(a, b)
    (a.root / "big.bin").chmod(0o700)  # a new version, the same bytes
    sync(a, b)
    assert (b.root / "big.bin").stat().st_mode & 0o777 == 0o700
    assert store_blocks(b) == 0 and store_blocks(a) == 0


def test_a_deleted_file_is_kept_even_when_its_twin_was_rewritten_in_place(
    tmp_path: Path,
) -> None:
    """The store's entry for two identical files was the other file's inode, rewritten
    in place (not scanned yet): deleting this one kept nothing of its bytes (seed 535)."""
    from backer.protocol.session import Session
    from tests.helpers import pump

    a, b = make_devices(tmp_path, 2)
    data = os.urandom(50_000)
    (a.root / "one.bin").write_bytes(data)
    (a.root / "two.bin").write_bytes(data)
    sync(a, b)
    entry = b.root / ".backer" / "store" / cid(data).hex()[:2] / cid(data).hex()
    twin = next(
        p for p in ("one.bin", "two.bin") if (b.root / p).stat().st_ino == entry.stat().st_ino
    )
    other = "two.bin" if twin == "one.bin" else "one.bin"
    with open(b.root / twin, "r+b") as handle:  # b's person, not scanned yet
        handle.write(b"rewritten in place")
    (a.root / other).unlink()
    a.scan()
    left, right = Session(a, "a"), Session(b, "b")
    pump(left, right)
    assert not (b.root / other).exists()
    assert held_bytes(b.root, b.catalog, cid(data)) == data


def test_a_share_made_before_the_chunk_path_index_gets_it_when_opened(tmp_path: Path) -> None:
    """Chunk rows are keyed by (hash, path): moving a replaced file's rows to its store
    entry (``UPDATE … WHERE path = ?``) scanned every chunk row of the share, for every
    file replaced. A database made before the index gets it when the share is opened,
    and the move goes through it."""
    key, root = nacl.signing.SigningKey.generate(), tmp_path / "share"
    root.mkdir()
    data = os.urandom(400_000)
    (root / "doc.bin").write_bytes(data)
    with Share.create(root, key) as share:
        share.scan()
    with contextlib.closing(sqlite3.connect(root / ".backer" / DB_FILE)) as old:
        old.execute("DROP INDEX chunks_path")  # the layout before it
        old.commit()
    with Share.open(root, key) as share:
        conn = share.catalog.conn
        query = "EXPLAIN QUERY PLAN UPDATE OR REPLACE chunks SET path = ? WHERE path = ?"
        plan = " ".join(row[-1] for row in conn.execute(query, ("x", "doc.bin")))
        assert "chunks_path" in plan, plan
        manifest = manifest_of_bytes(data)
        Store(root, share.catalog).retire("doc.bin", manifest.id)
        found = share.catalog.chunk_locations_of(ref.hash for ref in manifest.chunks)
        paths = {path for places in found.values() for path, _, _ in places}
        assert paths == {entry_name(manifest.id)}


def test_a_new_version_rewrites_only_the_chunk_rows_whose_place_changed(tmp_path: Path) -> None:
    """Recording a file's new version rewrote every one of its chunk rows (``INSERT OR
    REPLACE``), although after an insert the chunks before it are where they were."""
    (share,) = make_devices(tmp_path, 1)
    data = os.urandom(3 * 1024 * 1024)
    old, new = (
        manifest_of_bytes(data),
        manifest_of_bytes(data[:1_500_000] + b"x" * 10 + data[1_500_000:]),
    )
    share.catalog.put_manifests([("big.bin", old)])
    before = share.catalog.conn.total_changes
    share.catalog.put_manifests([("big.bin", new)])
    placed = {(ref.hash, ref.offset) for ref in old.chunks}
    moved = [ref for ref in new.chunks if (ref.hash, ref.offset) not in placed]
    assert 0 < len(moved) < len(new.chunks) - 5
    assert share.catalog.conn.total_changes - before == 1 + len(moved)  # (+ the manifest)


def _many_files(share: Share, count: int) -> dict[str, bytes]:
    """``count`` files of distinct contents in a few folders: path -> content id."""
    files = {}
    for n in range(count):
        path = f"d{n % 7}/f{n:04d}.txt"
        (share.root / path).parent.mkdir(exist_ok=True)
        (share.root / path).write_text(f"file {n}")
        files[path] = cid(f"file {n}".encode())
    return files


def _assert_all_kept(share: Share, files: dict[str, bytes]) -> None:
    """Every file is held by a hard link to its own inode and noted in the index."""
    assert set(Store(share.root, share.catalog).contents()) == set(files.values())
    for path, content in files.items():
        entry = share.root / entry_name(content)
        assert entry.lstat().st_ino == (share.root / path).lstat().st_ino, path


def test_a_first_scan_of_many_files_links_and_notes_every_one(tmp_path: Path) -> None:
    """A scan's files are kept in one pass (fan directories opened once, one INSERT):
    none may be skipped, nor kept as a copy."""
    (a,) = make_devices(tmp_path, 1)
    files = _many_files(a, 600)
    a.scan()
    _assert_all_kept(a, files)


def test_a_fan_directory_removed_mid_batch_is_made_again_with_every_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store keeps a fan directory open while it links a scan's files into it; one
    removed meanwhile took the links made so far along and refused the rest (ENOENT):
    those files had no kept copy left for a later edit or deletion."""
    (a,) = make_devices(tmp_path, 1)
    files = _many_files(a, 300)
    original, seen, removed = Store._link, set(), []

    def link_then_remove(self: Store, fd: int, path: str, content: bytes, *rest: Any) -> None:
        fan = content.hex()[:2]
        if fan in seen and not removed:  # a link is in it already: the fan goes
            shutil.rmtree(a.root / ".backer" / "store" / fan)
            removed.append(fan)
        seen.add(fan)
        original(self, fd, path, content, *rest)

    monkeypatch.setattr(Store, "_link", link_then_remove)
    a.scan()
    assert removed
    _assert_all_kept(a, files)


def test_a_file_that_became_ignored_then_replaced_is_still_served_from_the_store(
    tmp_path: Path,
) -> None:
    """Seed 50434: a recorded file became ignored, then was replaced while nothing
    watched it. Its version can still be needed (as a conflict copy once the rule
    goes), and the store's entry is its only copy: a peer's chunk request, and this
    device's own writes, must find the chunks there, not only at the stale path."""
    (a,) = make_devices(tmp_path, 1)
    data = os.urandom(300_000)
    (a.root / "h").write_bytes(data)
    a.scan()
    (a.root / ".backerignore").write_text("h\n")
    a.scan()  # h is forgotten: no longer watched
    fresh = a.root / "h.new"
    fresh.write_bytes(os.urandom(300_000))
    fresh.replace(a.root / "h")
    manifest = a.catalog.manifest(cid(data))
    assert manifest is not None
    hashes = [ref.hash for ref in manifest.chunks]
    served = ChunkStore(a.root, a.catalog).read_many(hashes)
    assert b"".join(bytes(served[h]) for h in hashes) == data


def test_R38_the_store_links_only_the_file_recorded_never_one_through_a_swapped_folder(
    tmp_path: Path,
) -> None:
    """The store linked a recorded file by its path after the scan: a folder on the way
    swapped for a link meanwhile (a person moving it away and linking it back) made
    the store hard-link a file outside the share, and a file replaced meanwhile made
    the entry of the recorded content hold other bytes (the recorded ones then gone)."""
    (share,) = make_devices(tmp_path, 1)
    (share.root / "d").mkdir()
    (share.root / "d" / "f.txt").write_bytes(b"recorded in d")
    (share.root / "g.txt").write_bytes(b"recorded g")
    recorded = {p: os.lstat(share.root / p).st_ino for p in ("d/f.txt", "g.txt")}
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f.txt").write_bytes(b"not the share's")
    (share.root / "d").rename(tmp_path / "moved-away")
    (share.root / "d").symlink_to(outside)
    (share.root / "g.new").write_bytes(b"saved over g")
    (share.root / "g.new").replace(share.root / "g.txt")
    store = Store(share.root, share.catalog)
    with share.db.conn:
        store.keep_files(
            [
                ("d/f.txt", cid(b"recorded in d"), 13, recorded["d/f.txt"]),
                ("g.txt", cid(b"recorded g"), 10, recorded["g.txt"]),
            ]
        )
    assert (outside / "f.txt").stat().st_nlink == 1  # never linked into the store
    assert (share.root / "g.txt").stat().st_nlink == 1
    assert kept(share) == {}
    assert not {cid(b"recorded in d"), cid(b"recorded g")} & set(store.contents())
    share.close()


def _no_hard_links(monkeypatch: pytest.MonkeyPatch) -> None:
    """``link()`` fails as on exFAT, FAT and many FUSE or SMB mounts (EPERM, once both
    names are looked up: EEXIST onto a name taken)."""
    monkeypatch.setattr(os, "link", link_without_hard_links)


def test_without_hard_links_a_kept_copy_outlives_a_twin_rewritten_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two files with one content, kept by one copy; the person rewrites one in place
    (not scanned yet) and a peer deletes the other: the store, told the content's last
    file went, looks for another recorded file holding it, finds the rewritten one and
    tries to keep it. The copy already kept must stay as it is (seed 185101)."""
    from backer.protocol.session import Session
    from tests.helpers import pump

    _no_hard_links(monkeypatch)
    a, b = make_devices(tmp_path, 2)
    data = os.urandom(50_000)
    (a.root / "one.bin").write_bytes(data)
    (a.root / "two.bin").write_bytes(data)
    sync(a, b)
    with open(b.root / "one.bin", "r+b") as handle:  # b's person, not scanned yet
        handle.write(b"rewritten in place")
    (a.root / "two.bin").unlink()
    a.scan()
    pump(Session(a, "a"), Session(b, "b"))
    assert not (b.root / "two.bin").exists()
    assert held_bytes(b.root, b.catalog, cid(data)) == data


def test_without_hard_links_a_copy_of_other_bytes_than_those_recorded_is_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store is told ``f`` holds what was recorded, but its person rewrote it in
    place since (same size, not scanned yet). A hard link would only name that file; a
    copy keeps its bytes for good under the recorded content's name, where every later
    save meets the entry and keeps it, and the recorded bytes were lost there."""
    _no_hard_links(monkeypatch)
    (a,) = make_devices(tmp_path, 1)
    (a.root / "f").write_bytes(b"written over")
    store = Store(a.root, a.catalog)
    with pytest.raises(OSError, match="no longer holds the bytes recorded"):
        store.keep("f", cid(b"recorded f!!"), 12)
    assert not (a.root / entry_name(cid(b"recorded f!!"))).exists()
    assert [p.name for p in (a.root / entry_name(cid(b"recorded f!!"))).parent.iterdir()] == []


def test_without_hard_links_every_replaced_content_is_kept_by_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On exFAT a share kept no version at all: every entry was a hard link, and a link
    that cannot be made cost the version. An edit in place, an editor's save (a new
    file renamed over the old), a deletion, and a peer's edit applied here: each old
    content is still readable, from a copy."""
    _no_hard_links(monkeypatch)
    a, b = make_devices(tmp_path, 2)
    (a.root / "inplace.txt").write_bytes(b"in place one")
    (a.root / "saved.txt").write_bytes(b"saved one")
    (a.root / "gone.txt").write_bytes(b"deleted one")
    sync(a, b)
    with open(a.root / "inplace.txt", "r+b") as file:  # the same inode, rewritten
        file.write(b"IN PLACE TWO")
    new = a.root / "saved.txt.new"
    new.write_bytes(b"saved two")
    new.replace(a.root / "saved.txt")
    (a.root / "gone.txt").unlink()
    sync(a, b)
    for old in (b"in place one", b"saved one", b"deleted one"):
        assert held_bytes(a.root, a.catalog, cid(old)) == old, old
        assert held_bytes(b.root, b.catalog, cid(old)) == old, old
    assert ChunkStore(a.root, a.catalog).read(manifest_of_bytes(b"in place one").chunks[0].hash)
    assert not [p for p in (a.root / ".backer" / "store").rglob("*.tmp")]


def test_without_hard_links_a_file_that_changes_while_copied_leaves_no_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy is of the file the scan hashed: one rewritten under it (its size or time
    no longer those looked at) gives no entry, rather than one whose name lies."""
    _no_hard_links(monkeypatch)
    (a,) = make_devices(tmp_path, 1)
    path = a.root / "busy.txt"
    path.write_bytes(b"as hashed")
    copy_file_range = os.copy_file_range

    def rewritten_meanwhile(source: int, target: int, count: int, *args: Any) -> int:
        done = copy_file_range(source, target, count, *args)
        path.write_bytes(b"rewritten while it was copied")
        return done

    monkeypatch.setattr(os, "copy_file_range", rewritten_meanwhile)
    a.scan()
    assert not Store(a.root, a.catalog).has(cid(b"as hashed"))
    assert not [p for p in (a.root / ".backer" / "store").rglob("*") if p.is_file()]


KILLED_MID_COPY = """
import os, sys, time
import nacl.signing
from backer.model.share import Share
from backer.versioner import store
from simulations.faults import link_without_hard_links

os.link = link_without_hard_links  # (exFAT, FAT: the store copies)
copy_bytes = store._copy_bytes


def copied_then_stopped(reading, writing, size):
    done = copy_bytes(reading, writing, size)
    print("copied", flush=True)
    time.sleep(120)  # (killed here, the copy not yet renamed in)
    return done


store._copy_bytes = copied_then_stopped
key = nacl.signing.SigningKey(bytes.fromhex(sys.argv[2]))
share = Share.open(__import__("pathlib").Path(sys.argv[1]), key)
share.scan()
"""


def test_a_copy_a_kill_left_in_the_store_is_removed_at_the_next_open(tmp_path: Path) -> None:
    """Without hard links a store entry is a whole copy of its file, written under a
    spare name and renamed in once checked: a process killed meanwhile left the copy
    in the store for good (nothing ever removed a spare), a file's size of the stick
    per kill. Spares are made in ``.backer/store/spares/``, emptied by the next process
    that opens the share to change it."""
    key = nacl.signing.SigningKey.generate()
    root = tmp_path / "share"
    root.mkdir()
    Share.create(root, key).close()
    (root / "video.bin").write_bytes(os.urandom(300_000))
    command = [sys.executable, "-c", KILLED_MID_COPY, str(root), bytes(key).hex()]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent)
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 120)
        assert ready and child.stdout.readline() == b"copied\n", "the copy did not start"
        spares = [p for p in (root / ".backer" / "store").rglob("*.tmp")]
        assert len(spares) == 1 and spares[0].stat().st_size == 300_000
    finally:
        child.kill()
        child.wait(30)
    Share.open(root, key).close()
    assert list((root / ".backer" / "store").rglob("*.tmp")) == [], "the kill's copy is left"


@pytest.mark.parametrize("copy_in_store", [False, True])
def test_without_hard_links_a_file_rewritten_under_its_recorded_stat_is_recorded_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, copy_in_store: bool
) -> None:
    """b's person rewrites f in place, same size, and puts its time back (or writes it
    within the filesystem's time step): the scan trusts the stat. The window that
    applies a's edit failed at every attempt where b's store held no copy of f's
    recorded bytes (it hashes the copy it makes: f no longer held them), and a's version
    never landed; where it held one (as it does once f was scanned or written), the
    window replaced f unread and b's bytes were lost. The window now has f hashed again:
    b's bytes become b's edit, a conflict with a's, and both devices hold both (R72)."""
    _no_hard_links(monkeypatch)
    a, b = make_devices(tmp_path, 2)
    (a.root / "f.txt").write_bytes(b"first version")
    os.utime(a.root / "f.txt", (1_700_000_000, 1_700_000_000))  # (settled: never re-hashed)
    sync(a, b)
    assert Store(b.root, b.catalog).has(cid(b"first version"))
    if not copy_in_store:  # (as a copy a full stick refused: keep_files goes on)
        with b.db.conn:
            Store(b.root, b.catalog).remove(cid(b"first version"))
    looked = (b.root / "f.txt").stat()
    with open(b.root / "f.txt", "r+b") as handle:  # b's person, the stat kept
        handle.write(b"FIRST")
    os.utime(b.root / "f.txt", ns=(looked.st_atime_ns, looked.st_mtime_ns))
    (a.root / "f.txt").write_bytes(b"a's second version")
    for _ in range(3):
        sync(a, b)
    assert tree(a.root) == tree(b.root)
    held = {data for kind, data, _ in tree(b.root).values() if kind == "file"}
    assert held == {b"FIRST version", b"a's second version"}
    assert [p.path for _, p, _ in b.catalog.problems()] == []
    a.close()
    b.close()
