"""A bounded simulation profile on every change (the campaign runner goes further)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

from simulations.machine import ClusterMachine

TestCluster = ClusterMachine.TestCase
TestCluster.settings = settings(
    max_examples=15,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
