"""The scheduler in a real pipeline: RabbitMQ, PostgreSQL, Celery workers on several "hosts"."""

from __future__ import annotations

import datetime as dt
import signal
import time

import pytest
from sqlalchemy import select

from megaflow import Client, Settings
from megaflow.db.models import Episode, Event, Host, SandboxRow
from megaflow.db.schema import upgrade
from megaflow.local_stack import WorkerProcess
from megaflow.scheduler.scale import report

pytestmark = pytest.mark.integration

SCRIPT = ["```bash\necho {step} >> trace.txt\n```", "```bash\nsubmit\n```"]


def spec(n_tasks: int, rollouts: int, latency: float) -> dict:
    return {"name": "sched", "rollouts": rollouts,
            "model": {"type": "scripted", "replies": SCRIPT, "latency_s": latency},
            "sandbox": {"type": "memory"},
            "tasks": [{"instance_id": f"t{i}", "instruction": "one line", "check": "test -s trace.txt"}
                      for i in range(n_tasks)]}


def peak_overlap(intervals: list[tuple[dt.datetime, dt.datetime]]) -> int:
    edges = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1]))
    peak = cur = 0
    for _, d in edges:
        cur += d
        peak = max(peak, cur)
    return peak


@pytest.fixture
def base(tmp_path, pg_url, amqp_vhost):
    upgrade(pg_url)
    settings = Settings(data_dir=tmp_path, database_url=pg_url, broker_url=amqp_vhost, host="h1",
                        sandbox_capacity=2, heartbeat_s=0.5, host_dead_after_s=3)
    workers: list[WorkerProcess] = []
    yield settings, workers
    for w in workers:
        if w.alive():
            w.kill(signal.SIGCONT)
        w.stop()


def start(workers, pool, settings, name, **extra) -> WorkerProcess:
    w = WorkerProcess(pool, settings.model_copy(update=extra), name=name).start()
    workers.append(w)
    return w


def test_capacity_is_never_exceeded_with_racing_workers(base):
    settings, workers = base
    start(workers, "model", settings, "model")
    for i in range(3):  # three agent workers race to admit and end episodes
        start(workers, "agent", settings, f"agent{i}")
    start(workers, "env", settings, "env1", host="h1")
    start(workers, "env", settings, "env2", host="h2")
    client = Client(settings)
    run_id = client.submit(spec(6, 3, latency=0.2))
    st = client.wait(run_id, timeout=240)
    assert st["by_state"] == {"succeeded": 18}, st
    with client.session() as s:
        rows = s.execute(select(SandboxRow.host, SandboxRow.created_at, SandboxRow.destroyed_at)).all()
        assert len(rows) == 18 and all(r.destroyed_at for r in rows)
        for host in ("h1", "h2"):
            peak = peak_overlap([(a, b) for h, a, b in rows if h == host])
            assert 1 <= peak <= 2, f"{host} held {peak} sandboxes at once, capacity 2"
        assert peak_overlap([(a, b) for _, a, b in rows]) <= 4
        assert {r.host for r in rows} == {"h1", "h2"}
        waited = s.execute(select(Event.subject_id).where(Event.kind == "episode.waiting")).scalars().all()
        admitted = s.execute(select(Event.subject_id).where(Event.kind == "episode.admitted")).scalars().all()
        assert waited and set(waited) == set(admitted), "every waiter must be admitted once"
        assert len(admitted) == len(set(admitted))
        assert all(e.wait_reason is None for e in s.execute(select(Episode)).scalars())
    events = client.events(run_id)
    assert events["group.done"] == 6 and events["run.done"] == 1
    # The elasticity signal sees the work just done, both hosts and the queues.
    out = report(settings, client.app, window_s=600)
    assert set(out["pools"]) == {"model", "agent", "env"}
    assert out["pools"]["env"]["hosts"] == 2 and out["pools"]["model"]["hops_per_s"] > 0
    assert out["queues"]["env.h1"]["consumers"] == 1 and out["queues"]["agent"]["consumers"] == 3
    assert all(p["recommended"] >= 1 for p in out["pools"].values())


def test_a_joining_host_gets_work_and_a_silent_host_gets_none(base):
    settings, workers = base
    start(workers, "model", settings, "model")
    start(workers, "agent", settings, "agent")
    h1 = start(workers, "env", settings, "env1", host="h1", sandbox_capacity=1)
    client = Client(settings)
    run_id = client.submit(spec(20, 1, latency=0.6))
    deadline = time.monotonic() + 60
    while client.status(run_id)["by_state"].get("waiting", 0) == 0:
        assert time.monotonic() < deadline, f"no episode ever waited for capacity: {client.status(run_id)}"
        time.sleep(0.2)
    assert client.status(run_id)["waiting"], "waiting episodes must say why"

    # A second host joins: it must get episodes within seconds of being ready.
    start(workers, "env", settings, "env2", host="h2", sandbox_capacity=2)
    with client.session() as s:
        joined = _wait_for(lambda: s.execute(select(Host.started_at).where(Host.name == "h2")).scalar(), 60)
        first = _wait_for(lambda: s.execute(select(SandboxRow.created_at).where(SandboxRow.host == "h2")
                                            .order_by(SandboxRow.created_at)).scalars().first(), 30)
    assert (first - joined).total_seconds() < 5

    # h1 stops heartbeating (frozen): once it counts as dead, nothing is placed on it.
    h1.kill(signal.SIGSTOP)
    time.sleep(settings.host_dead_after_s + 1)
    dead_from = dt.datetime.now(dt.UTC)
    time.sleep(4)
    dead_until = dt.datetime.now(dt.UTC)
    h1.kill(signal.SIGCONT)
    client.wait(run_id, timeout=180)
    with client.session() as s:
        placed = s.execute(select(Episode.host, Episode.admitted_at).where(
            Episode.run_id == run_id, Episode.admitted_at > dead_from, Episode.admitted_at < dead_until)).all()
    assert placed, "no admission happened while h1 was silent; the test proves nothing"
    assert {h for h, _ in placed} == {"h2"}
    assert client.status(run_id)["by_state"] == {"succeeded": 20}


def _wait_for(probe, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_quota_over_limit_waits_visibly_then_runs_when_raised(base):
    from megaflow.db.engine import session_scope
    from megaflow.scheduler import admission, quotas

    settings, workers = base
    for pool in ("model", "agent", "env"):
        start(workers, pool, settings, pool, sandbox_capacity=8)
    with session_scope(settings.database_url) as s:
        quotas.set_quota(s, "user", "alice", max_concurrent=1, max_total=3)
    client = Client(settings)
    run_id = client.submit({**spec(4, 1, latency=0.2), "user": "alice"})
    deadline = time.monotonic() + 120
    while True:
        st = client.status(run_id)
        if sum(st["by_state"].get(x, 0) for x in ("succeeded", "failed")) == 3:
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.3)
    time.sleep(1.0)
    st = client.status(run_id)
    assert st["status"] == "running" and st["by_state"] == {"succeeded": 3, "waiting": 1}, st
    assert st["waiting"] == {"quota user alice: max_total 3 reached": 1}
    with client.session() as s:
        rows = s.execute(select(SandboxRow.created_at, SandboxRow.destroyed_at)).all()
    assert peak_overlap(rows) == 1, "max_concurrent 1 was exceeded"
    # Raising the quota is an admission event: the waiter runs at once.
    with session_scope(settings.database_url) as s:
        quotas.set_quota(s, "user", "alice", max_concurrent=1, max_total=10)
        admitted = admission.admit_waiting(s, settings)
    admission.send(client.app, admitted)
    assert client.wait(run_id, timeout=60)["by_state"] == {"succeeded": 4}
