"""Operations against real workers, RabbitMQ and PostgreSQL: `status --watch`, `metrics`, `report`.

One cluster and one finished run serve the module, so the three commands are
checked against the same numbers without paying for the workers' start three times.
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from browser import ARTIFACTS, ROOT, chromium, chromium_binary, free_port, megaflow, stop, wait_http
from conftest import fresh_database, fresh_vhost, need, running_cluster
from prometheus_client.parser import text_string_to_metric_families

from megaflow import Client, Settings
from megaflow.local_stack import settings_env

pytestmark = pytest.mark.integration

HOST = "ops-host"
SCRIPT = ["```bash\necho {step} >> trace.txt\n```", "```bash\nsubmit\n```"]


def mixed_spec(name: str, latency: float, ok: int = 4) -> dict:
    """`ok` tasks that pass, one that the check fails (reward 0), one whose setup fails (infra_failed)."""
    tasks = [{"instance_id": f"{name}-ok{i}", "instruction": "append a line", "check": "cat trace.txt"}
             for i in range(ok)]
    tasks.append({"instance_id": f"{name}-zero", "instruction": "append a line", "check": "false"})
    tasks.append({"instance_id": f"{name}-broken", "instruction": "x", "setup": ["exit 3"], "check": "true"})
    return {"name": name, "rollouts": 2, "model": {"type": "scripted", "replies": SCRIPT, "latency_s": latency},
            "sandbox": {"type": "local"}, "tasks": tasks}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pg_server, amqp_server):
    """The module's one cluster (conftest's `cluster` is per test); yields its `Settings`."""
    with fresh_database(pg_server) as database, fresh_vhost(amqp_server) as broker:
        settings = Settings(data_dir=tmp_path_factory.mktemp("ops"), database_url=database, broker_url=broker,
                            host=HOST)
        with running_cluster(settings, name="ops-", env={"MEGAFLOW_WORKER_CONCURRENCY": "2"}):
            yield settings

def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def watched_run(cluster):
    """A run followed to its end by `megaflow status --watch`: piped, and in a tmux terminal when tmux exists."""
    env = settings_env(cluster)
    client = Client(cluster)
    # Long enough (~5 s) for the terminal watcher to start and draw a frame mid-run.
    run_id = client.submit(mixed_spec("watched", latency=0.4))
    cmd = [sys.executable, "-m", "megaflow", "status", run_id, "--watch"]
    full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    tmux = shutil.which("tmux")
    session = f"mf-watch-{uuid.uuid4().hex[:6]}"
    screens: list[str] = []
    piped = None
    if tmux:
        line = shlex.join(["env", f"PYTHONPATH={ROOT}", *(f"{k}={v}" for k, v in env.items()), *cmd])
        _tmux("new-session", "-d", "-s", session, "-x", "110", "-y", "24", "-c", str(ROOT), f"{line}; sleep 60")
    try:
        piped = subprocess.Popen(cmd, env=full_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
        deadline = time.monotonic() + 60
        while piped.poll() is None and time.monotonic() < deadline:
            if tmux:
                screens.append(_tmux("capture-pane", "-p", "-t", session))
            time.sleep(0.5)
        out, _ = piped.communicate(timeout=max(1.0, deadline - time.monotonic()))
        # The terminal watcher polls on its own clock: give it time to draw its last frame.
        while tmux and not (screens and "finished" in screens[-1]) and time.monotonic() < deadline + 15:
            time.sleep(0.5)
            screens.append(_tmux("capture-pane", "-p", "-t", session))
    finally:
        if piped is not None:
            stop(piped)
        if tmux:
            subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, check=False)
    return run_id, piped.returncode, out, screens


def test_status_watch_follows_the_run_to_its_final_counts(watched_run):
    run_id, rc, out, _ = watched_run
    assert rc == 0, out
    final = [line for line in out.splitlines() if line.startswith(f"run {run_id} finished:")]
    assert final, out
    line = final[-1]
    # 6 tasks x 2 rollouts: 8 pass, 2 fail their check (reward 0), 2 never get a sandbox.
    assert "12/12 ended" in line and "succeeded=10" in line and "infra_failed=2" in line, line
    # Two turns (a command, then submit) for each of the 10 episodes that got a sandbox.
    assert re.search(r"\b20 steps, [0-9.]+ steps/s \(whole run\)", line), line
    assert "mean reward 0.800" in line and "failures: setup_failed=2" in line, line


def test_status_watch_draws_live_bars_in_a_terminal(watched_run):
    need("tmux", shutil.which("tmux") is not None, "apt-get install tmux")
    run_id, _, _, screens = watched_run
    live = [s for s in screens if "running" in s and "steps/s" in s and "━" in s]
    assert live, "no live progress panel seen:\n" + "\n---\n".join(screens[-3:])
    last = screens[-1]
    assert f"run {run_id}" in last and "finished" in last and "failures: setup_failed=2" in last, last
    for state in ("pending", "provisioning", "running", "evaluating", "succeeded", "infra_failed"):
        assert state in last, state


def _scrape(url: str) -> dict[str, dict[tuple, float]]:
    """``{sample name: {sorted label items: value}}`` of one scrape."""
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def test_metrics_scraped_during_and_after_a_run(cluster, watched_run, tmp_path):
    port = free_port()
    log = tmp_path / "metrics.log"
    proc = megaflow(["metrics", "--port", str(port)], settings_env(cluster), log)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        assert wait_http(url, proc, log).status_code == 200
        client = Client(cluster)
        run_id = client.submit(mixed_spec("scraped", latency=0.2, ok=2))
        during = _scrape(url)
        client.wait(run_id, timeout=60)
        after = _scrape(url)
    finally:
        stop(proc)
    for scrape in (during, after):
        assert scrape["megaflow_up"] == {(("component", "database"),): 1.0, (("component", "broker"),): 1.0}
        queues = {dict(k)["queue"] for k in scrape["megaflow_queue_messages"]}
        assert {"model", "agent", "env", f"env.{HOST}", "megaflow.dead"} <= queues, queues
        assert scrape["megaflow_queue_consumers"][(("queue", "model"),)] >= 1
    in_flight = sum(v for k, v in during["megaflow_episodes"].items()
                    if dict(k)["state"] in ("pending", "provisioning", "running", "evaluating"))
    assert in_flight > 0, during["megaflow_episodes"]
    episodes = {dict(k)["state"]: v for k, v in after["megaflow_episodes"].items()}
    # Both runs of this module: 12 + 8 episodes.
    assert episodes["succeeded"] == 16 and episodes["infra_failed"] == 4 and episodes["running"] == 0, episodes
    assert after["megaflow_runs"][(("status", "finished"),)] == 2
    sandboxes = {tuple(v for _, v in k): n for k, n in after["megaflow_sandboxes"].items()}
    assert sandboxes.get((HOST, "destroyed"), 0) >= 16, sandboxes
    generate = {k: v for k, v in after["megaflow_hop_duration_seconds_bucket"].items() if dict(k)["hop"] == "generate"}
    counts = [v for _, v in sorted(generate.items(), key=lambda kv: float(dict(kv[0])["le"]))]
    assert counts == sorted(counts), "buckets must be cumulative"
    # Two model calls per episode with a sandbox: 10 in the first run, 6 in the second.
    assert counts[-1] == after["megaflow_hop_duration_seconds_count"][(("hop", "generate"),)] == 32
    assert after["megaflow_hop_duration_seconds_sum"][(("hop", "generate"),)] >= 20 * 0.4 + 12 * 0.2
    assert {"provision", "exec", "evaluate"} <= {dict(k)["hop"] for k in after["megaflow_hop_duration_seconds_count"]}
    tokens = after["megaflow_model_tokens_total"]
    assert tokens[(("kind", "completion"),)] > 0 and tokens[(("kind", "prompt"),)] > 0
    # Every hop's message carried its publish stamp: queue wait is recorded for each hop.
    queued = after["megaflow_hop_queued_seconds_count"]
    assert queued[(("hop", "generate"),)] == 32, queued
    hops = {dict(k)["hop"]: v for k, v in after["megaflow_hops_total"].items() if dict(k)["outcome"] == "ok"}
    assert hops["generate"] == 32, hops
    ended = {(dict(k)["state"], dict(k)["exit_status"]): n for k, n in after["megaflow_episodes_finished_total"].items()}
    assert ended == {("succeeded", "submitted"): 16, ("infra_failed", "setup_failed"): 4}, ended
    for name in ("megaflow_hops_total", "megaflow_model_tokens_total", "megaflow_hop_duration_seconds_count"):
        assert all(after[name][k] >= v for k, v in during.get(name, {}).items()), name


@pytest.fixture(scope="module")
def report_path(cluster, watched_run, tmp_path_factory):
    from typer.testing import CliRunner

    from megaflow.cli.main import app

    run_id = watched_run[0]
    out = tmp_path_factory.mktemp("report") / "report.html"
    result = CliRunner().invoke(app, ["report", run_id, "--out", str(out)], env=settings_env(cluster))
    assert result.exit_code == 0, result.output
    return out


def test_report_is_self_contained_with_every_plot(report_path, watched_run):
    document = report_path.read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", document)
    assert len(images) == 4, "timeline, hop latency, rewards, failures"
    for b64 in images:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in document and "https://" not in document, "nothing loaded from elsewhere"
    for text in ("Concurrency and throughput", "Hop latency", "Rewards", "Failures by kind", "setup_failed",
                 watched_run[0], "generate", "mean reward"):
        assert text in document, text


def test_report_renders_in_chromium(report_path):
    need("chromium", chromium_binary() is not None, "apt-get install chromium")
    shot = ARTIFACTS / "report.png"
    dom = chromium(report_path.as_uri(), dump_dom=True, size="1100,3000")
    chromium(report_path.as_uri(), screenshot=shot, size="1100,3000")
    assert dom.count("<img") == 4
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
