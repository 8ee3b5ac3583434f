"""The simulations' retention invariant: nothing inside the retention window is ever
pruned (checked on real nodes of a simulated cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest

from backer.model import entropy
from backer.versioner.prune import prune
from backer.versioner.retention import Policy
from simulations.cluster import Cluster
from simulations.invariants import check_retention_window
from simulations.world import InvariantBroken


def test_the_invariant_holds_for_prune_and_catches_a_version_pruned_too_young(
    tmp_path: Path,
) -> None:
    cluster = Cluster(tmp_path / "cluster", seed=7, size=2)
    try:
        for data in (b"one", b"two", b"three"):
            cluster.write(0, "f.txt", data)
            cluster.scan(0)
            assert cluster.sync(0, 1)
        share = cluster.nodes[1].open()  # it applied each change: it kept the old bytes
        with share.db.conn:
            report = prune(share.root, share.catalog, entropy.now_ms())
        assert report.files == 0 and report.kept_files == 3  # the last hour: all kept
        check_retention_window(cluster)
        eager = Policy(keep_all_ms=0, hourly_until_ms=0, daily_until_ms=0, weekly_until_ms=0)
        with share.db.conn:
            report = prune(share.root, share.catalog, entropy.now_ms(), policy=eager)
        assert report.versions == 2
        with pytest.raises(InvariantBroken, match="inside the 3600000 ms retention window"):
            check_retention_window(cluster)
    finally:
        cluster.close()
