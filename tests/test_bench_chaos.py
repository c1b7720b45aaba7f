"""`megaflow bench chaos`: its accounting (fast, no services), a small run under fire on
bubblewrap (workers SIGKILLed every 2–5 s, RabbitMQ and PostgreSQL restarted once each,
on a private node and server), and a smaller one on docker where an engine answers.
The full benchmark (500 episodes over three seeds) is `megaflow bench chaos`; see docs/benchmarks.md.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from types import SimpleNamespace

import pytest
from conftest import docker_engine, need

from megaflow.bench.chaos import COMMAND, N_COMMANDS, REPORT, chaos_spec, run_chaos_bench
from megaflow.bench.chaos_watch import classify_infra_failures, sandbox_accounting, targets
from megaflow.bench.faults import kill_interval
from megaflow.spec import RunSpec


def _ep(eid, state="succeeded", reward=1.0):
    return SimpleNamespace(id=eid, state=state, reward=reward)


def _bash(script: str, cwd) -> str:
    return subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, check=True).stdout


def _steps(tmp_path, order: list[int]) -> list:
    """Run the spec's commands in `order` (a repeat is a duplicate, a gap a loss); the steps the ledger would hold."""
    (tmp_path / "patch.txt").write_text("off\n" * N_COMMANDS)
    out = {i: _bash(COMMAND.format(step=i, line=i + 1), tmp_path) for i in order}
    steps = [(i, "cmd", out[i]) for i in sorted(out)]
    return [*steps, (N_COMMANDS, "report", _bash(REPORT, tmp_path))]


def _check(tmp_path) -> float:
    check = chaos_spec(4)["tasks"][0]["check"]
    return 1.0 if subprocess.run(["bash", "-c", check], cwd=tmp_path).returncode == 0 else 0.0


def test_spec_is_valid_and_has_slow_provisions():
    spec = chaos_spec(40, seed=3)
    RunSpec.model_validate(spec)
    slow = [t for t in spec["tasks"] if t["setup"]]
    assert len(slow) == len(spec["tasks"]) // 4 and all(t["setup"][0].startswith("sleep ") for t in slow)


def test_commands_run_once_leave_a_clean_trace_and_a_full_reward(tmp_path):
    steps = _steps(tmp_path, [0, 1, 2, 3])
    assert _check(tmp_path) == 1.0
    fig = sandbox_accounting([_ep("e")], {"e": steps}, N_COMMANDS)
    assert (fig["duplicate_commands"], fig["commands_lost"], fig["wrong_rewards"]) == (0, 0, 0)


def test_a_duplicate_shows_in_the_sandbox_and_in_the_reward(tmp_path):
    steps = _steps(tmp_path, [0, 1, 1, 2, 3])  # step 1 ran twice: its line is toggled back off
    reward = _check(tmp_path)
    assert reward == 0.0
    fig = sandbox_accounting([_ep("e", reward=reward)], {"e": steps}, N_COMMANDS)
    assert fig["duplicate_commands"] >= 1 and fig["commands_lost"] == 0 and fig["wrong_rewards"] == 1


def test_a_lost_command_shows_too(tmp_path):
    steps = _steps(tmp_path, [0, 2, 3])
    steps.insert(1, (1, "cmd", "(output lost)"))  # the ledger says it ran
    fig = sandbox_accounting([_ep("e", reward=_check(tmp_path))], {"e": steps}, N_COMMANDS)
    assert fig["commands_lost"] == 1 and fig["duplicate_commands"] == 0


def test_a_wrong_reward_alone_counts_as_a_change():
    fig = sandbox_accounting([_ep("e", reward=0.0)], {"e": []}, N_COMMANDS)
    assert fig["duplicate_commands"] == 1 and fig["wrong_rewards"] == 1


def test_infra_failures_are_injected_only_when_a_fault_explains_them():
    t = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    at = t.timestamp()
    restarts = [{"service": "postgres", "start": at + 100, "end": at + 102}]
    kills = [(at + 5, "env"), (at + 50, "model")]
    failed = [
        {"id": "a", "exit_status": "exec_interrupted", "started_at": t, "exec_decided_at": t + dt.timedelta(seconds=4),
         "exec_attempts": 2,
         "finished_at": t + dt.timedelta(seconds=8)},
        {"id": "b", "exit_status": "exec_interrupted", "started_at": t, "exec_decided_at": t + dt.timedelta(seconds=20),
         "exec_attempts": 2,
         "finished_at": t + dt.timedelta(seconds=30)},
        {"id": "c", "exit_status": "evaluation_failed", "error": "SandboxNotFoundError: No such container",
         "started_at": t, "finished_at": t + dt.timedelta(seconds=6)},
        {"id": "d", "exit_status": "decision_crashed", "error": "OperationalError: connection refused",
         "started_at": t, "finished_at": t + dt.timedelta(seconds=101)},
        {"id": "e", "exit_status": "poison", "poison_hop": "env", "started_at": t,
         "finished_at": t + dt.timedelta(seconds=60)},
    ]
    got = {c["episode"]: c["cause"] for c in classify_infra_failures(failed, kills, restarts, max_deliveries=5)}
    assert got == {"a": "injected", "b": "self-made", "c": "self-made", "d": "injected", "e": "self-made"}


def test_a_failed_start_stops_the_workers_already_started(monkeypatch):
    import random

    from megaflow.bench import chaos
    from megaflow.bench.faults import FaultLog
    from megaflow.config import Settings

    started, stopped = [], []

    class Worker:
        def __init__(self, pool, settings, name):
            self.pool = pool

        def start(self):
            if self.pool == "env":
                raise RuntimeError("env worker did not start")
            started.append(self.pool)
            return self

        def stop(self):
            stopped.append(self.pool)

    monkeypatch.setattr(chaos, "WorkerProcess", Worker)
    with pytest.raises(RuntimeError, match="env worker"):
        chaos._run(Settings(), 1, 1.0, "local", None, None, 5.0, False, random.Random(0), 0, FaultLog(), {})
    assert started == ["model", "agent"] and sorted(stopped) == ["agent", "model"]


def test_targets_and_kill_intervals():
    ok = {"episodes_lost": 0, "chords_unclosed": 0, "duplicate_commands": 0, "commands_lost": 0,
          "infra_failed_self_made": 0, "peak_sandboxes": 64, "capacity": 64, "leaked_after_run": 0}
    assert all(targets(ok).values())
    assert targets({**ok, "peak_sandboxes": 65})["peak_sandboxes <= capacity"] is False
    assert kill_interval("2-5") == (2.0, 5.0)
    assert kill_interval(10) == pytest.approx((7.0, 13.0))
    with pytest.raises(ValueError):
        kill_interval("5-2")


def _assert_targets(figures: dict, episodes: int) -> None:
    summary = {k: figures.get(k) for k in ("episodes", "episodes_lost", "chords_unclosed", "duplicate_commands",
                                           "commands_lost", "infra_failed_classified", "peak_sandboxes",
                                           "leaked_after_run", "faults_injected", "notes")}
    # Where a small run's time went (it has taken 44 s and 181 s on the same machine).
    print("\nchaos timings:", {k: figures.get(k) for k in ("elapsed_s", "longest_stall_s", "stalled", "recovery_wait_s",
                                                         "reap_wait_s", "resumed", "infra_failed", "kills")})
    assert figures["episodes"] == episodes, summary
    assert figures["episodes_lost"] == 0 and figures["all_terminal"] and figures["run_finished"], summary
    assert figures["chords_unclosed"] == 0, summary
    assert figures["duplicate_commands"] == 0 and figures["commands_lost"] == 0, summary
    assert figures["wrong_rewards"] == 0, summary
    assert figures["infra_failed_self_made"] == 0, summary
    assert figures["peak_sandboxes"] <= figures["capacity"], summary
    assert figures["leaked_after_run"] == 0 and figures["leaked_after_cleanup"] == 0, figures
    assert figures["dead_lettered_platform"] == 0, figures["dead_lettered_platform_tasks"]
    # Bad input during the run: every spec refused, every malformed message dead-lettered, no pickle loaded.
    assert figures["bad_specs_refused"] + figures["malformed_messages_dead_lettered"] == figures["bad_inputs_tried"]
    assert not figures["pickle_unpickled"]
    # What failed for the injected faults' reasons is re-run by resume, and then nothing is left failed.
    if figures["infra_failed"]:
        assert figures["infra_failed_after_resume"] == 0 and figures["run_finished_after_resume"], figures


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_small_chaos_run_loses_duplicates_and_leaks_nothing():
    from megaflow.bench.services import missing

    why = missing()
    need("a private RabbitMQ node and PostgreSQL server", why is None, why or "")
    need("bubblewrap", subprocess.run(["which", "bwrap"], capture_output=True).returncode == 0)
    # 40 episodes see every fault (kills of each pool, both restarts) in about a minute;
    # the benchmark runs 500.
    figures = run_chaos_bench(episodes=40, kill_every_s="2-5", private_services=True, seed=7, timeout_s=600,
                              capacity=24, reap_wait_s=200)
    _assert_targets(figures, 40)
    # Both services really went down and came back, and workers really died.
    assert [r["service"] for r in figures["service_restarts"]] == ["rabbitmq", "postgres"], figures["notes"]
    assert all(r["ok"] for r in figures["service_restarts"]), figures["service_restarts"]
    assert sum(figures["kills"].values()) >= 4 and figures["redelivered_messages"] > 0, figures


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_small_chaos_run_on_docker(monkeypatch):
    from megaflow.bench.services import missing

    why = missing()
    need("a private RabbitMQ node and PostgreSQL server", why is None, why or "")
    docker_engine(monkeypatch)
    figures = run_chaos_bench(episodes=12, kill_every_s="2-5", sandbox="docker", private_services=True, seed=3,
                              timeout_s=400, capacity=8, reap_wait_s=200)
    _assert_targets(figures, 12)
