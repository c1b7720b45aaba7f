"""`megaflow bench rl`, small: the three modes run on real workers and report their figures."""

from __future__ import annotations

import pytest

from megaflow.bench.rl import run_rl_bench

pytestmark = [pytest.mark.integration]


def test_bench_rl_reports_idle_fractions(make_cluster):
    # Only the services of a cluster: the bench starts its own workers.
    cluster = make_cluster("bench-rl-host", pools=())
    figures = run_rl_bench(steps=2, groups=1, rollouts=2, model="tiny", latency_s=0.5, settings=cluster.settings)
    for mode in ("sync", "async1", "async2"):
        assert 0.0 <= figures[f"trainer_idle_fraction_{mode}"] <= 1.0
        assert figures[f"train_s_per_step_{mode}"] > 0
        assert figures[f"weight_sync_s_per_step_{mode}"] > 0
    # sync: the second batch was sampled by version 1 only, after the first step was published.
    assert figures["policy_versions_sampled_sync"] == [0, 1]
    assert figures["rollout_s_per_step"] >= 1.0          # two turns of 0.5 s each, at least
    assert 0.0 < figures["ideal_idle_fraction_sync"] < 1.0
    assert figures["trainer_idle_fraction_sync"] > figures["trainer_idle_fraction_async2"]
