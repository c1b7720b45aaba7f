"""A small `megaflow bench chaos`: workers SIGKILLed every few seconds, RabbitMQ and
PostgreSQL restarted once each (a private node and server, so nothing else is disturbed).
The full benchmark (500 episodes, a kill every ~10 s) is `megaflow bench chaos`; see the README.
"""

from __future__ import annotations

import pytest
from conftest import need

from megaflow.bench.chaos import run_chaos_bench
from megaflow.bench.services import missing

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]


def test_small_chaos_run_loses_duplicates_and_leaks_nothing():
    why = missing()
    need("a private RabbitMQ node and PostgreSQL server", why is None, why or "")
    figures = run_chaos_bench(episodes=80, kill_every_s=3.0, private_services=True, seed=7, timeout_s=600)
    summary = {k: figures[k] for k in ("episodes", "episodes_lost", "duplicate_steps", "leaked_sandboxes",
                                       "infra_failed", "faults_injected", "notes")}
    assert figures["episodes"] == 80, summary
    assert figures["episodes_lost"] == 0 and figures["all_terminal"] and figures["run_finished"], summary
    assert figures["duplicate_steps"] == 0 and figures["wrong_rewards"] == 0, summary
    assert figures["leaked_sandboxes"] == 0, figures
    # Both services really went down and came back, and workers really died.
    assert [r["service"] for r in figures["service_restarts"]] == ["rabbitmq", "postgres"], figures["notes"]
    assert all(r["ok"] for r in figures["service_restarts"]), figures["service_restarts"]
    assert sum(figures["kills"].values()) >= 4 and figures["redelivered_messages"] > 0, figures
    # Bad input during the run: every spec refused, every malformed message dead-lettered, no pickle loaded.
    assert figures["bad_specs_refused"] + figures["malformed_messages_dead_lettered"] == figures["bad_inputs_tried"]
    assert not figures["pickle_unpickled"]
    # What failed for the platform's reasons is re-run by resume, and then nothing is left failed.
    if figures["infra_failed"]:
        assert figures["infra_failed_after_resume"] == 0 and figures["run_finished_after_resume"], figures
