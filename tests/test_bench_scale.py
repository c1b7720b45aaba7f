"""`megaflow bench scale` in small: simulated latencies really delay hops on the broker
(without holding workers), and the figures the issue names are all there; the arithmetic behind its
makespan floor, on a hand-made ledger (no services)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess

import pytest
from typer.testing import CliRunner

from megaflow.bench.scale import throughput_floor_inputs
from megaflow.cli.main import app as cli

KEYS = ("inflight_episodes", "steps_per_s", "littles_law_steps_per_s", "ratio_to_littles_law", "hop_delay_p99_s",
        "worker_rss_mb", "makespan_s", "makespan_growth")


@pytest.mark.integration
def test_bench_scale_small(pg_url, amqp_vhost, monkeypatch, tmp_path):
    monkeypatch.setenv("MEGAFLOW_DATABASE_URL", pg_url)
    monkeypatch.setenv("MEGAFLOW_BROKER_URL", amqp_vhost)
    monkeypatch.setenv("MEGAFLOW_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(cli, ["bench", "scale", "--sizes", "1,16", "--steps", "2", "--model-latency", "1.5",
                                      "--exec-latency", "0.5", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    for key in KEYS:
        assert key in figures, key
    # 3 model calls and 2 commands of simulated latency: 5.5 s per episode, whatever N.
    assert figures["episode_latency_s"] == 5.5
    for n, makespan in figures["makespan_s"].items():
        assert 5.5 <= makespan < 60, (n, makespan)
    assert figures["inflight_episodes"] == 16
    assert 0.3 < figures["ratio_to_littles_law"] <= 1.05
    assert figures["worker_rss_mb"] > 0 and figures["hop_delay_p99_s"] >= 0
    # Last phase: the submit turn's model call and decision, grading and the final decision.
    assert figures["last_phase_hops"] == 4 and figures["peak_hops_per_s"] > 0
    # The floor: N = 1's makespan plus 16 last phases at the run's peak hop rate. (A bound only when
    # the run saturates the machine, as 10,000 episodes do; 16 do not, so no comparison here.)
    floor = figures["makespan_s"]["1"] + 16 * 4 / figures["peak_hops_per_s"]
    assert figures["makespan_floor_s"] == pytest.approx(floor, abs=0.06)
    assert figures["makespan_growth_floor"] == pytest.approx(floor / figures["makespan_s"]["1"], abs=0.002)
    by_pool = figures["worker_rss_mb_by_pool"]
    # Each pool's peak: together at least the peak of the total.
    assert set(by_pool) == {"agent", "env", "model"} and sum(by_pool.values()) >= figures["worker_rss_mb"] - 1
    assert set(figures["worker_rss_mb_by_pool_by_n"]) == {"1", "16"}
    assert figures["worker_rss_mb_by_pool_by_n"]["16"] == by_pool  # the largest N's peaks are the figure's
    # The waits happened in broker-side delay queues, one per target queue and delay.
    vhost = amqp_vhost.rsplit("/", 1)[1]
    out = subprocess.run(["rabbitmqctl", "list_queues", "-p", vhost, "name", "arguments"], capture_output=True,
                         text=True, check=True).stdout
    assert "megaflow.delay.model.1500" in out and "x-message-ttl" in out
    assert any(line.startswith("megaflow.delay.env.") and ".500" in line for line in out.splitlines())


@pytest.mark.integration
def test_bench_scale_refuses_a_database_with_unfinished_runs(pg_url, amqp_vhost, monkeypatch, tmp_path):
    """An interrupted earlier run's episodes would be admitted first (FIFO) and skew every figure."""
    from megaflow.client import Client
    from megaflow.config import Settings

    monkeypatch.setenv("MEGAFLOW_DATABASE_URL", pg_url)
    monkeypatch.setenv("MEGAFLOW_BROKER_URL", amqp_vhost)
    monkeypatch.setenv("MEGAFLOW_DATA_DIR", str(tmp_path))
    from megaflow.db.schema import upgrade

    upgrade(pg_url)
    run_id = Client(Settings()).submit({"name": "left-over", "model": {"type": "scripted", "replies": ["x"]},
                                        "sandbox": {"type": "memory"},
                                        "tasks": [{"instance_id": "a", "instruction": "x", "check": "true"}]})
    result = CliRunner().invoke(cli, ["bench", "scale", "--sizes", "1", "--steps", "1", "--json"])
    assert result.exit_code != 0
    assert run_id in result.output and "megaflow cancel" in result.output


@pytest.mark.integration
def test_delayed_hops_declare_their_queue_now_and_then_not_per_message(amqp_vhost, monkeypatch, tmp_path):
    """kombu cannot cache the declaration of a queue with x-expires: without care every
    delayed hop would declare it again (three round trips). It is declared once, and
    again only after a quarter of its expiry, so it never expires with messages in it."""
    from kombu import Queue

    from megaflow.app import make_app
    from megaflow.config import Settings
    from megaflow.hops import delay

    app = make_app(Settings(broker_url=amqp_vhost, data_dir=tmp_path))
    declared = []
    real_declare = Queue.declare
    monkeypatch.setattr(Queue, "declare", lambda q, *a, **k: declared.append(q.name) or real_declare(q, *a, **k))
    clock = [1000.0]
    monkeypatch.setattr(delay.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(delay, "_declared", {})
    first = delay.delayed_options(app, "model", 30.0)
    assert first["declare"] == [] and first["queue"] == "megaflow.delay.model.30000"
    for _ in range(5):
        app.send_task("megaflow.noop", **delay.delayed_options(app, "model", 30.0))
    assert declared == ["megaflow.delay.model.30000"]
    clock[0] += 0.25 * 600 + 1  # x-expires is 600 s for a 30 s delay
    delay.delayed_options(app, "model", 30.0)
    assert declared == ["megaflow.delay.model.30000"] * 2
    with app.connection_for_write() as conn:
        assert conn.default_channel.queue_declare("megaflow.delay.model.30000", passive=True).message_count == 5


# -- the arithmetic behind the makespan floor, on a hand-made ledger ---------------------------

def at(s: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(1_000_000 + s, dt.UTC)


def episode(eid: str, t0: float) -> list[tuple]:
    names = ["agent.start", "provision", "agent.provision", "generate", "agent.generate", "exec", "agent.exec",
             "generate", "agent.generate", "evaluate", "agent.evaluate"]
    return [(eid, name, at(t0 + i * 0.5), 0.01) for i, name in enumerate(names)]


def test_peak_rate_is_the_busiest_window_and_the_last_phase_starts_at_the_last_model_call():
    hops = episode("a", 0.0) + episode("b", 0.2) + episode("c", 30.0)
    hops.append(("d", "agent.start", None, None))  # unfinished rows do not count
    figures = throughput_floor_inputs(hops, window_s=10.0)
    # a and b finish all 22 of their hops in the first 10 s window.
    assert figures == {"peak_hops_per_s": 2.2, "last_phase_hops": 4}


def test_no_finished_hops_gives_no_floor():
    assert throughput_floor_inputs([("a", "agent.start", None, None)]) == {}
