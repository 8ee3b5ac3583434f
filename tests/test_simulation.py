"""A bounded simulation profile on every change (the campaign runner goes further)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from simulations.campaign import run_seed
from simulations.machine import ClusterMachine

TestCluster = ClusterMachine.TestCase
TestCluster.settings = settings(
    max_examples=15,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.parametrize(
    ("seed", "nodes"),
    [(4, 3), (7, 3), (19, 3), (35, 3), (90, 3), (181, 3), (479, 3), (494, 3), (512, 5),
     (518, 5), (524, 5),
     (527, 5), (529, 5), (535, 5), (545, 5), (580, 5), (786, 5), (839, 5), (992, 5)],
)  # fmt: skip
def test_campaign_seeds_that_once_failed(seed: int, nodes: int) -> None:
    """Seeds that found bugs (chunk index with one location per chunk, conflict copies
    of versions their own device replaced, shadowed files, unconverged journals; a
    restored device's lost versions beside its new ones (90, 529), a restored device
    applying peers' changes before its own history was back (545), joiners' events ahead
    of the genesis (527), temp links never swept (181, 580), a recovery check made one
    round too early (512), temp files moved with a renamed directory (839, 992), a
    directory made where a recorded file had just been deleted (479, 494))."""
    stats = run_seed(seed, nodes, 200)
    assert stats["steps"] == 200


def test_a_seed_replays_byte_for_byte() -> None:
    """Version ids, client ids, clocks and file times all come from the seed: two runs of
    one seed end with identical journals (merkle roots) and identical traffic."""
    first, second, other = run_seed(21, 3, 120), run_seed(21, 3, 120), run_seed(22, 3, 120)
    assert first["fingerprint"] == second["fingerprint"]
    assert first["bytes"] == second["bytes"]
    assert other["fingerprint"] != first["fingerprint"]
