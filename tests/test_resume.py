"""`megaflow resume RUN`: after a full stop, real workers SIGKILLed, queues purged or not, on the real
RabbitMQ and PostgreSQL; and what it records, on SQLite and the embedded broker (no workers).
"""

from __future__ import annotations

import json
import signal
import time

import pytest
from conftest import run_megaflow
from sqlalchemy import func, select, update
from test_model_openai import fake_servers

from megaflow import Client, RunSpec, Settings
from megaflow.db import states
from megaflow.db.engine import session_scope
from megaflow.db.models import Episode, Event, RolloutGroup, SandboxRow
from megaflow.db.schema import upgrade
from megaflow.local_stack import WorkerProcess, settings_env
from megaflow.ops.stats import failures_by_kind
from megaflow.reaper import reap

HOST = "rs-host"
SCRIPT = ["```bash\necho {step} >> trace.txt\n```"] * 2 + ["```bash\nsubmit\n```"]
QUEUES = ["agent", "model", "env", f"env.{HOST}"]


def spec(n_tasks: int = 4, rollouts: int = 3, latency: float = 0.4) -> dict:
    return {"name": "resume-me", "rollouts": rollouts,
            "model": {"type": "scripted", "replies": SCRIPT, "latency_s": latency}, "sandbox": {"type": "local"},
            "tasks": [{"instance_id": f"t{i}", "instruction": "two lines", "check": "test $(wc -l < trace.txt) -eq 2"}
                      for i in range(n_tasks)]}


@pytest.fixture
def stack(tmp_path, pg_url, amqp_vhost):
    settings = Settings(data_dir=tmp_path, database_url=pg_url, broker_url=amqp_vhost, host=HOST)
    upgrade(pg_url)
    started: list[WorkerProcess] = []

    def start(tag: str) -> dict[str, WorkerProcess]:
        env = {"MEGAFLOW_WORKER_CONCURRENCY": "2"}
        workers = {p: WorkerProcess(p, settings, name=f"rs-{p}-{tag}", extra_env=env).start()
                   for p in ("model", "agent", "env")}
        started.extend(workers.values())
        return workers

    yield settings, start
    for w in started:
        w.stop()


def _stop_all(client: Client, run_id: str, workers: dict[str, WorkerProcess], purge: bool) -> dict:
    deadline = time.monotonic() + 90
    while client.status(run_id)["by_state"].get("succeeded", 0) < 2:
        assert time.monotonic() < deadline, "no progress before the stop"
        time.sleep(0.1)
    for w in workers.values():
        w.kill(signal.SIGKILL)
    if purge:
        with client.app.connection_for_write() as conn:
            for q in QUEUES:
                conn.default_channel.queue_purge(q)
    st = client.status(run_id)
    unfinished = sum(n for state, n in st["by_state"].items() if state not in ("succeeded", "failed"))
    assert unfinished > 0, st
    return st


def _assert_resumed_exactly(client: Client, run_id: str, n: int, rerun: int) -> None:
    st = client.status(run_id)
    assert st["status"] == "finished" and st["by_state"] == {"succeeded": n}, st
    rows = client.results(run_id)
    assert len(rows) == n and all(r["reward"] == 1.0 for r in rows)
    assert sum(1 for r in rows if r["attempt"] == 1) == rerun
    with client.session() as s:
        old = s.execute(select(Episode).where(Episode.run_id == run_id, Episode.superseded_by.is_not(None))
                        ).scalars().all()
        assert len(old) == rerun
        for ep in old:  # history kept: the old attempt ended, and points at its successor
            assert ep.state == "infra_failed"
            new = s.get(Episode, ep.superseded_by)
            assert new.retry_of == ep.id and new.attempt == ep.attempt + 1 and new.sample_index == ep.sample_index
        groups = s.execute(select(RolloutGroup.stats).where(RolloutGroup.run_id == run_id)).scalars().all()
        assert all(g["n"] == 3 and g["mean"] == 1.0 for g in groups), groups
    events = client.events(run_id)
    assert events["run.resumed"] == 1 and events["run.done"] == 1
    assert events["group.done"] == len(groups)


def _no_leaks(settings: Settings, client: Client, run_id: str) -> None:
    reap(settings, all_hosts=True, grace_s=0)
    with client.session() as s:
        live = s.execute(select(func.count()).select_from(SandboxRow).where(
            SandboxRow.run_id == run_id, SandboxRow.destroyed_at.is_(None))).scalar()
    assert live == 0
    assert not list((settings.data_dir / "sandboxes").glob("mf-*"))


@pytest.mark.integration
def test_resume_after_full_stop_with_purged_queues(stack):
    settings, start = stack
    client = Client(settings)
    workers = start("a")
    run_id = client.submit(spec())
    _stop_all(client, run_id, workers, purge=True)
    time.sleep(1.0)
    assert client.status(run_id)["status"] == "running"  # nothing moves it any more
    # The CLI, as an operator would run it, with every worker down.
    env = {k: v for k, v in settings_env(settings).items() if k != "MEGAFLOW_DATA_DIR"}
    r = run_megaflow(["resume", run_id, "--json", "--no-follow"], settings.data_dir, timeout=120, extra_env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["generation"] == 1 and report["rerun"] == report["interrupted"] > 0
    start("b")
    client.wait(run_id, timeout=180)
    _assert_resumed_exactly(client, run_id, 12, report["rerun"])
    _no_leaks(settings, client, run_id)


@pytest.mark.integration
def test_resume_while_old_messages_are_still_queued(stack):
    """Not purged: the old lineages wake up with the new workers, find their episodes superseded and stop."""
    settings, start = stack
    client = Client(settings)
    workers = start("a")
    run_id = client.submit(spec())
    _stop_all(client, run_id, workers, purge=False)
    report = client.resume(run_id)
    start("b")
    client.wait(run_id, timeout=180)
    time.sleep(2.0)  # let the old lineages drain
    _assert_resumed_exactly(client, run_id, 12, report["rerun"])
    assert client.status(run_id)["status"] == "finished"
    _no_leaks(settings, client, run_id)


@pytest.mark.integration
def test_resume_reruns_infra_failed_never_counts_them_done_and_keeps_agent_failures(stack):
    settings, start = stack
    client = Client(settings)
    start("a")
    healthy = {"on": False}

    def reply(body):
        if not healthy["on"]:
            return 503, {"error": "down"}
        n = sum(1 for m in body["messages"] if m["role"] == "assistant")
        text = "I refuse to use bash." if "stubborn" in body["messages"][1]["content"] else SCRIPT[min(n, 2)]
        return 200, {"model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                "finish_reason": "stop"}], "usage": {}}

    with fake_servers(reply) as [server]:
        s = {"name": "flaky", "sandbox": {"type": "local"}, "limits": {"model_retries": 0, "max_format_errors": 0},
             "model": {"type": "openai", "model": "m", "endpoints": [server.url], "max_retries": 0},
             "tasks": [{"instance_id": "plain", "instruction": "two lines", "check": "test $(wc -l < trace.txt) -eq 2"},
                       {"instance_id": "stubborn", "instruction": "stubborn", "check": "true"}]}
        run_id = client.submit(s)
        st = client.wait(run_id, timeout=90)
        assert st["by_state"] == {"infra_failed": 2} and st["mean_reward"] is None, st
        healthy["on"] = True
        report = client.resume(run_id)
        assert (report["rerun"], report["infra_failed"], report["interrupted"]) == (2, 2, 0)
        st = client.wait(run_id, timeout=90)
        assert st["by_state"] == {"succeeded": 1, "failed": 1}, st
        # The agent's own failure is a result: a second resume leaves it alone.
        again = client.resume(run_id)
        assert again["rerun"] == 0 and again["generation"] == 2
        st = client.wait(run_id, timeout=60)
    assert st["by_state"] == {"succeeded": 1, "failed": 1} and st["status"] == "finished"
    rows = {r["instance_id"]: r for r in client.results(run_id)}
    assert rows["plain"]["attempt"] == 1 and rows["plain"]["reward"] == 1.0
    assert rows["stubborn"]["exit_status"] == "format_errors"
    with client.session() as s:
        assert s.execute(select(func.count()).select_from(Episode).where(Episode.run_id == run_id)).scalar() == 4
        kinds = [k for k in s.execute(select(Event.kind).where(Event.run_id == run_id)).scalars()]
    assert kinds.count("run.resumed") == 2 and kinds.count("run.done") == 3


# -- what resume records, on SQLite and the embedded broker (no workers) -----------------------

def test_resume_ends_interrupted_episodes_with_an_event_and_counts_current_failures_only(tmp_path, sqlite_url):
    settings = Settings(data_dir=tmp_path, database_url=sqlite_url)
    client = Client(settings)
    spec = {"name": "r", "rollouts": 2, "model": {"type": "scripted", "replies": ["x"]},
            "sandbox": {"type": "memory"}, "tasks": [{"instance_id": "t", "instruction": "i", "check": "true"}]}
    run_id, _ = client._record(RunSpec.parse(spec))
    with session_scope(sqlite_url) as s:
        running, failed = s.execute(select(Episode.id).where(Episode.run_id == run_id)).scalars().all()
        s.execute(update(Episode).where(Episode.id == running).values(state=states.RUNNING))
        s.execute(update(Episode).where(Episode.id == failed).values(state=states.INFRA_FAILED,
                                                                     exit_status="evaluation_failed"))
        assert failures_by_kind(s, run_id) == {"evaluation_failed": 1}
    report = client.resume(run_id)
    assert (report["interrupted"], report["infra_failed"]) == (1, 1)
    with session_scope(sqlite_url) as s:
        ended = s.execute(select(Event.subject_id, Event.data).where(Event.kind == "episode.ended")).all()
        # The re-run attempts are pending: the superseded failures are history, not the run's failures.
        assert failures_by_kind(s, run_id) == {}
    assert [(eid, d["exit_status"]) for eid, d in ended] == [(running, "interrupted")]
