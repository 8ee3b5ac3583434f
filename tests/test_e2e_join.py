"""Joining through the real CLI: where it goes, and directory modes as they were."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.e2e import Device, free_port, invite


def test_join_without_dir_says_it_uses_the_current_directory_and_dir_modes_arrive_exactly(
    tmp_path: Path,
) -> None:
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    (a.root / "locked").mkdir(parents=True)
    (a.root / "locked" / "inside.txt").write_text("kept")
    (a.root / "writeonly").mkdir()
    (a.root / "open").mkdir()
    a.run("init", str(a.root))
    (a.root / "locked").chmod(0o000)
    (a.root / "writeonly").chmod(0o333)
    (a.root / "open").chmod(0o750)
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    b.root.mkdir()
    with a.serving(port):
        joined = subprocess.run(
            b.command("join", token), cwd=b.root, env=b.env, capture_output=True, text=True
        )
    assert joined.returncode == 0, joined.stderr
    assert f"joining into the current directory, {b.root}" in joined.stderr
    modes = {name: (b.root / name).stat().st_mode & 0o777 for name in ("locked", "writeonly")}
    assert modes == {"locked": 0o000, "writeonly": 0o333}
    assert (b.root / "open").stat().st_mode & 0o777 == 0o750
    assert (b.root / "locked" / "inside.txt").read_text() == "kept"
