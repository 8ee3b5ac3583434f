"""Applying received versions to disk: every entry kind on every path, checked writes,
verified files, ``.backer/versions/`` never reachable through a link."""

from __future__ import annotations

import os
from pathlib import Path

from tests.helpers import make_devices, sync, tree


def test_links_mixed_with_files_above_the_syncfs_threshold_are_applied(tmp_path: Path) -> None:
    """A staged link met the per-file fsync path (O_NOFOLLOW on a link: ELOOP) and the
    whole session failed."""
    a, b = make_devices(tmp_path, 2)
    (a.root / "big").write_bytes(os.urandom(3 * 1024 * 1024))
    (a.root / "also-big").write_bytes(os.urandom(2 * 1024 * 1024))
    os.symlink("big", a.root / "link")
    os.symlink("nowhere", a.root / "dangling")
    sync(a, b)
    assert tree(a.root) == tree(b.root)
    (a.root / "link").unlink()
    os.symlink("also-big", a.root / "link")
    (a.root / "big").write_bytes(os.urandom(3 * 1024 * 1024))
    _, right = sync(a, b)
    assert tree(a.root) == tree(b.root)
    assert not [r.errors for r in right.replicator.reports if r.errors]
