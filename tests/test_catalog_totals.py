"""``status`` totals are added up inside SQLite from the encoded records: they must say
what decoding every live version says, for every kind of entry."""

from __future__ import annotations

import os
from pathlib import Path

import nacl.signing

from backer.model.records import Kind
from backer.model.share import Share


def test_totals_count_every_kind_and_the_bytes_of_files_alone(tmp_path: Path) -> None:
    root = tmp_path / "share"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "a.txt").write_bytes(b"x" * 1000)
    (root / "big.bin").write_bytes(os.urandom(300_000))
    (root / "gone.txt").write_bytes(b"soon deleted")
    os.symlink("docs/a.txt", root / "link")
    share = Share.create(root, nacl.signing.SigningKey.generate())
    share.scan()
    (root / "gone.txt").unlink()
    share.scan()
    decoded = {kind: 0 for kind in Kind}
    for _, _, version in share.catalog.all_live():
        decoded[version.kind] += 1
    totals = share.catalog.totals()
    assert totals == {"files": 2, "directories": 1, "symlinks": 1, "deleted": 1, "bytes": 301_000}
    names = {Kind.FILE: "files", Kind.DIRECTORY: "directories", Kind.SYMLINK: "symlinks"}
    assert all(totals[names.get(kind, "deleted")] == count for kind, count in decoded.items())
    share.close()
