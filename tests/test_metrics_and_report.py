"""Metrics, report and progress on a hand-made run in SQLite: no service needed."""

from __future__ import annotations

import base64
import datetime as dt
import re

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from megaflow.cli.progress import StepRate, info_line
from megaflow.config import Settings
from megaflow.db.engine import session_scope
from megaflow.db.models import Episode, Hop, RolloutGroup, Run, SandboxRow, Step, TaskInstance, utcnow
from megaflow.ops import stats
from megaflow.ops.metrics import MegaFlowCollector, make_registry
from megaflow.ops.report import render_html

#: (state, exit status, reward, steps) per episode of the hand-made run.
EPISODES = [("succeeded", "submitted", 1.0, 3)] * 5 + [("succeeded", "submitted", 0.0, 3)] * 2 + [
    ("failed", "step_limit", -0.5, 5), ("failed", "format_errors", -0.5, 2),
    ("infra_failed", "setup_failed", None, 0), ("infra_failed", "setup_failed", None, 0), ("running", None, None, 1)]


@pytest.fixture
def run(sqlite_url) -> tuple[str, str]:
    """A run of 12 episodes with steps, hops and sandboxes, timed over the last 30 seconds."""
    now = utcnow()
    with session_scope(sqlite_url) as s:
        s.add(Run(id="r1", name="units", spec={}, n_episodes=len(EPISODES), status="running"))
        s.add(TaskInstance(id="t1", run_id="r1", instance_id="task-1", kind="terminal", data={}))
        s.flush()
        s.add(RolloutGroup(id="g1", run_id="r1", task_instance_id="t1", index=0, size=len(EPISODES)))
        s.flush()
        for i, (state, exit_status, reward, n_steps) in enumerate(EPISODES):
            start = now - dt.timedelta(seconds=30 - i)
            end = start + dt.timedelta(seconds=5 + i % 3) if state != "running" else None
            s.add(Episode(id=f"e{i}", seq=i, run_id="r1", group_id="g1", task_instance_id="t1", sample_index=i,
                          state=state, exit_status=exit_status, reward=reward, n_steps=n_steps,
                          created_at=start, started_at=start if n_steps else None, finished_at=end))
            s.add(SandboxRow(id=f"sb{i}", backend="memory", host="h1" if i % 2 else "h2",
                             state="destroyed" if end else "in_use"))
        s.flush()
        for i, (_, _, _, n_steps) in enumerate(EPISODES):
            for k in range(n_steps):
                s.add(Step(episode_id=f"e{i}", index=k, messages_in=[], completion_tokens=10, prompt_tokens=100))
                for hop, duration in (("generate", 0.2 + 0.01 * k), ("exec", 0.05), ("agent.generate", 0.004)):
                    s.add(Hop(subject_id=f"e{i}", step_index=k, hop=hop, task_id="x", status="done",
                              finished_at=now - dt.timedelta(seconds=5), duration_s=duration,
                              queued_s=0.5 if hop == "exec" else None))
    return sqlite_url, "r1"


def test_failures_by_kind_and_run_data(run):
    url, run_id = run
    with session_scope(url) as s:
        assert stats.failures_by_kind(s, run_id) == {"setup_failed": 2, "format_errors": 1, "step_limit": 1}
        data = stats.load_run(s, run_id)
    assert data.steps == sum(e[3] for e in EPISODES) == 29
    assert data.by_state() == {"running": 1, "succeeded": 7, "failed": 2, "infra_failed": 2}
    assert len(data.hop_durations["generate"]) == 29


def test_report_has_every_plot(run):
    url, run_id = run
    with session_scope(url) as s:
        document = render_html(stats.load_run(s, run_id))
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", document)
    assert len(images) == 4
    assert all(base64.b64decode(b)[:4] == b"\x89PNG" for b in images)
    assert "setup_failed" in document and "step_limit" in document and "units" in document
    # Queue wait beside work time: exec waited 500 ms; hops recorded without a stamp show "-".
    assert "queued p50 ms" in document and "work p50 ms" in document
    assert re.search(r"<td>exec</td><td>29</td>(<td>[0-9.]+</td>){4}<td>500\.0</td>", document)
    assert re.search(r"<td>generate</td><td>29</td>(<td>[0-9.]+</td>){4}<td>-</td>", document)


def test_report_rates_name_the_watch_window(run):
    """The report's rates are over the window the watch's closing line calls "whole run", with the same figure."""
    url, run_id = run
    with session_scope(url) as s:
        data = stats.load_run(s, run_id)
        span = stats.run_span_s(s, run_id)
    document = render_html(data)
    assert span and data.span_s == span
    assert f"<td>steps / s (whole run)</td><td>{data.steps / span:.2f}</td>" in document
    # The watch prints the same rate over the same span, and names the window the same way.
    assert f"{data.steps / span:.1f} steps/s (whole run)" in info_line(
        {"episodes": 12, "steps": data.steps, "by_state": {}, "mean_reward": None}, {}, data.steps / span, "whole run")
    assert "<td>steps / s</td>" not in document and "<td>episodes / s (whole run)</td>" in document


def test_report_of_a_run_that_has_not_started(sqlite_url):
    with session_scope(sqlite_url) as s:
        s.add(Run(id="r0", name="<new>", spec={}, n_episodes=0))
    with session_scope(sqlite_url) as s:
        document = render_html(stats.load_run(s, "r0"))
        with pytest.raises(LookupError):
            stats.load_run(s, "nope")
    assert "data:image" not in document and "no episode started" in document
    assert "&lt;new&gt;" in document, "names are escaped"


def test_metrics_on_the_embedded_stack(run, tmp_path):
    url, _ = run
    settings = Settings(data_dir=tmp_path, database_url=url)
    text = generate_latest(make_registry(MegaFlowCollector(settings))).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("megaflow_up", (("component", "database"),))] == 1
    assert samples[("megaflow_up", (("component", "broker"),))] == 1
    assert samples[("megaflow_episodes", (("state", "failed"),))] == 2
    assert samples[("megaflow_episodes", (("state", "pending"),))] == 0
    assert samples[("megaflow_sandboxes", (("host", "h1"), ("state", "destroyed")))] == 5
    assert samples[("megaflow_hop_duration_seconds_count", (("hop", "generate"),))] == 29
    assert samples[("megaflow_hop_duration_seconds_bucket", (("hop", "exec"), ("le", "0.05")))] == 29
    assert samples[("megaflow_hop_duration_seconds_bucket", (("hop", "generate"), ("le", "0.1")))] == 0
    assert samples[("megaflow_model_tokens_total", (("kind", "completion"),))] == 290
    assert samples[("megaflow_hops_total", (("hop", "generate"), ("outcome", "ok")))] == 29
    assert samples[("megaflow_episodes_finished_total", (("exit_status", "setup_failed"), ("state", "infra_failed")))] == 2
    assert ("megaflow_queue_messages", (("queue", "env.h1"),)) in samples


def test_metrics_report_a_dead_broker_as_a_value(run, tmp_path):
    url, _ = run
    # Nothing listens on port 1: the scrape still answers, with broker 0.
    settings = Settings(data_dir=tmp_path, database_url=url, broker_url="amqp://guest:guest@127.0.0.1:1//")
    text = generate_latest(make_registry(MegaFlowCollector(settings))).decode()
    assert 'megaflow_up{component="broker"} 0.0' in text
    assert 'megaflow_up{component="database"} 1.0' in text
    assert "megaflow_episodes" in text


def test_step_rate_and_progress_line():
    rate = StepRate(window_s=10)
    assert rate.add(0.0, 0) == 0.0
    assert rate.add(2.0, 10) == 5.0
    assert rate.add(20.0, 100) == pytest.approx(90 / 18)  # the oldest sample left the window
    line = info_line({"episodes": 4, "steps": 7, "mean_reward": 0.5,
                      "by_state": {"succeeded": 2, "pending": 1, "infra_failed": 1}}, {"setup_failed": 1}, 2.5,
                     "last 10 s")
    assert line == ("3/4 ended | pending=1 succeeded=2 infra_failed=1 | 7 steps, 2.5 steps/s (last 10 s) | "
                    "mean reward 0.500 | failures: setup_failed=1")
