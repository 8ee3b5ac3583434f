"""What ``history``, ``log`` and ``--at`` say about versions and times is true: bytes
nothing pruned are not called pruned."""

from __future__ import annotations

from pathlib import Path

from tests.e2e import Device


def test_history_calls_bytes_pruned_only_where_a_prune_dropped_them(tmp_path: Path) -> None:
    """A lone device's file overwritten in place before its next scan: the replaced
    version's bytes were never kept anywhere, and 'history' said they were "pruned on
    every device" (no prune had run)."""
    a = Device(tmp_path, "a")
    a.root.mkdir()
    (a.root / "notes.txt").write_bytes(b"first")
    a.run("init", str(a.root), "-q")
    (a.root / "notes.txt").write_bytes(b"second!")  # (in place: the old bytes are gone)
    a.run("scan", "--dir", str(a.root), "-q")
    replaced = a.run("history", str(a.root / "notes.txt")).stdout.splitlines()[0]
    assert "pruned" not in replaced, replaced
    assert "(bytes not here; no device holds them: no restore can bring them back)" in replaced

