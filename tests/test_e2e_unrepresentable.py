"""A name the receiving side refuses: reported per file, and retried once the sender
renames it. Here the receiver's share folder lies deeper than the sender's, so a path
that fits PATH_MAX on the sender is too long on the receiver (ENAMETOOLONG) — the same
path through backer as a name a receiver's filesystem rejects (vfat, an NFD-storing
disk whose spelling outgrows NAME_MAX)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.e2e import Device, free_port, invite, snapshot

PATH_MAX = 4096  # bytes, the terminating NUL included
LONG_NAME = "L" * 250


def _problems(device: Device) -> list[dict]:
    out = device.run("status", "--json", "--dir", str(device.root)).stdout
    return json.loads(out)["problems"]


def _deep_directories(a_root: Path, b_root: Path) -> str:
    """Directories that fit on both devices, with room for a short name below them on
    the receiver (``b_root``) but not for ``LONG_NAME``, which fits on the sender."""
    room = PATH_MAX - 1 - len(os.fsencode(b_root)) - 1 - 100  # 100: a short name fits
    parts, used = [], 0
    while used < room:
        part = "d" * min(200, room - used - 1)
        parts.append(part)
        used += len(part) + 1
    relative = "/".join(parts)
    assert len(os.fsencode(b_root / relative / LONG_NAME)) >= PATH_MAX
    assert len(os.fsencode(a_root / relative / LONG_NAME)) < PATH_MAX - 1
    return relative


def test_a_path_too_long_for_the_receiver_is_reported_and_arrives_once_renamed(
    tmp_path: Path,
) -> None:
    a = Device(tmp_path, "a")
    deeper = tmp_path / ("r" * 250)
    deeper.mkdir()
    b = Device(deeper, "b")
    relative = _deep_directories(a.root, b.root)
    (a.root / relative).mkdir(parents=True)
    (a.root / relative / LONG_NAME).write_text("fits on a, not on b")
    (a.root / "ok.txt").write_text("fits everywhere")
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with a.serving(port) as address:
        joined = b.run("join", token, str(b.root), check=False)
        assert joined.returncode == 3, joined.stdout + joined.stderr
        assert "File name too long" in joined.stderr
        assert (b.root / "ok.txt").read_text() == "fits everywhere"
        assert (b.root / relative).is_dir()
        problems = _problems(b)
        assert [(p["path"], p["reason"]) for p in problems] == [
            (f"{relative}/{LONG_NAME}", "File name too long")
        ]
        (a.root / relative / LONG_NAME).rename(a.root / relative / "short.txt")
        done = b.run("sync", address, "--dir", str(b.root))  # exit 0: nothing failed
        assert "errors 0" in done.stdout, done.stdout + done.stderr
    assert (b.root / relative / "short.txt").read_text() == "fits on a, not on b"
    assert _problems(b) == []
    assert snapshot(b.root) == snapshot(a.root)
