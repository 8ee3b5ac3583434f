"""A running node whose share folder goes away or is taken over (findings R15, R16)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.e2e import joined_pair, snapshot, wait_until


def test_r15_a_share_folder_moved_away_is_not_served_until_it_is_back(tmp_path: Path) -> None:
    a, b, (a_port, b_port) = joined_pair(tmp_path)
    for n in range(5):
        (a.root / f"f{n}.txt").write_text(f"file {n}\n")
    a_node, b_node = a.start(a_port), b.start(b_port)
    try:
        b.run("sync", a_node.address, "--dir", str(b.root), check=False)
        wait_until(lambda: (b.root / "f4.txt").exists(), [a_node, b_node])
        wait_until(lambda: " open (" in b_node.log, [a_node, b_node])
        events_before = len(json.loads(a.run("log", "--json", "--dir", str(a.root)).stdout))

        moved = tmp_path / "b-moved"
        b.root.rename(moved)
        b.root.mkdir()  # what the mount point of an unmounted disk looks like
        time.sleep(2)
        (a.root / "after-move.txt").write_text("written while b's folder is away\n")
        time.sleep(4)  # several root checks and dial attempts

        assert list(b.root.iterdir()) == []  # no .backer, no file written into it
        assert b_node.log.count("not served: the share folder") == 1
        assert sorted(snapshot(a.root)) == ["after-move.txt", *(f"f{n}.txt" for n in range(5))]
        events = json.loads(a.run("log", "--json", "--dir", str(a.root)).stdout)
        assert not [e for e in events[events_before:] if "deleted" in json.dumps(e).lower()]
        assert not (moved / "after-move.txt").exists()

        b.root.rmdir()
        moved.rename(b.root)
        b_node.wait_for("the share folder is back: served again")
        wait_until(lambda: (b.root / "after-move.txt").exists(), [a_node, b_node])
        (b.root / "from-b.txt").write_text("b records again\n")
        wait_until(lambda: (a.root / "from-b.txt").exists(), [a_node, b_node])
        assert sorted(snapshot(a.root)) == sorted(snapshot(b.root))
    finally:
        for device in (a, b):
            for node in list(device.nodes):
                node.stop()


