"""The core pipeline against the real RabbitMQ and PostgreSQL, with real Celery workers."""

from __future__ import annotations

import signal
import time

import pytest
from sqlalchemy import func, select

from megaflow import Client
from megaflow.db.models import Episode, Event, Hop, Step
from megaflow.local_stack import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.cluster(host="it-host")]

SCRIPT = ["```bash\necho {step} >> trace.txt\n```", "```bash\necho {step} >> trace.txt\n```", "```bash\nsubmit\n```"]


def spec(n_tasks: int, rollouts: int, latency: float = 0.0, sandbox: str = "local") -> dict:
    return {
        "name": "it",
        "rollouts": rollouts,
        "model": {"type": "scripted", "replies": SCRIPT, "latency_s": latency},
        "sandbox": {"type": sandbox},
        "tasks": [{"instance_id": f"t{i}", "instruction": "append two lines", "check": "test $(cat trace.txt | wc -l) -eq 2"}
                  for i in range(n_tasks)],
    }


def assert_run_exact(client: Client, run_id: str, n_episodes: int, n_groups: int, steps_per_episode: int) -> None:
    st = client.status(run_id)
    assert st["status"] == "finished"
    assert st["by_state"] == {"succeeded": n_episodes}, st
    with client.session() as s:
        eps = s.execute(select(Episode).where(Episode.run_id == run_id)).scalars().all()
        assert len(eps) == n_episodes
        for ep in eps:
            assert ep.reward == 1.0 and ep.exit_status == "submitted" and ep.n_steps == steps_per_episode
            assert ep.finished_at is not None and ep.started_at is not None
        steps = s.execute(select(Step).join(Episode, Episode.id == Step.episode_id)
                          .where(Episode.run_id == run_id)).scalars().all()
        assert len(steps) == n_episodes * steps_per_episode
        assert all(st.completion and st.action for st in steps)
        assert sum(1 for st in steps if st.action == "submit") == n_episodes
        assert all(st.exit_code == 0 for st in steps if st.action != "submit")
        # Every hop of every episode recorded exactly once, and finished.
        ids = [e.id for e in eps]
        hops = s.execute(select(Hop.hop, func.count()).where(Hop.subject_id.in_(ids)).group_by(Hop.hop)).all()
        hops = dict(hops)
        assert hops["provision"] == n_episodes and hops["evaluate"] == n_episodes
        assert hops["generate"] == n_episodes * steps_per_episode
        assert hops["exec"] == n_episodes * (steps_per_episode - 1)
        assert s.execute(select(func.count()).select_from(Hop).where(Hop.status != "done")).scalar() == 0
    events = client.events(run_id)
    assert events["group.done"] == n_groups, "group callback must fire exactly once per group"
    assert events["run.done"] == 1, "run callback must fire exactly once"
    assert events["episode.ended"] == n_episodes


def test_run_of_20_episodes_completes_exactly(cluster):
    settings, workers = cluster.settings, cluster.workers
    client = Client(settings)
    run_id = client.submit(spec(5, 4))
    client.wait(run_id, timeout=120)
    assert_run_exact(client, run_id, n_episodes=20, n_groups=5, steps_per_episode=3)
    with client.session() as s:
        stats = [g for g in s.execute(select(Event.data).where(Event.kind == "group.done")).scalars()]
    assert all(g["mean"] == 1.0 and g["n"] == 4 for g in stats)


@pytest.mark.parametrize("victim", ["agent", "model"])
def test_sigkill_mid_run_loses_and_duplicates_nothing(cluster, victim):
    settings, workers = cluster.settings, cluster.workers
    client = Client(settings)
    run_id = client.submit(spec(10, 4, latency=0.05))
    deadline = time.monotonic() + 120
    for round_, progress in enumerate((25, 60)):
        while client.status(run_id)["steps"] < progress:
            assert time.monotonic() < deadline, "run made no progress"
            time.sleep(0.05)
        workers[victim].kill(signal.SIGKILL)
        time.sleep(0.5)
        assert client.status(run_id)["status"] == "running"
        workers[victim] = WorkerProcess(victim, settings, name=f"{victim}{round_ + 2}").start()
    client.wait(run_id, timeout=180)
    assert_run_exact(client, run_id, n_episodes=40, n_groups=10, steps_per_episode=3)


def _snapshot(client: Client, run_id: str) -> dict:
    from megaflow.chord_backend import parts_table

    with client.session() as s:
        ids = select(Episode.id).where(Episode.run_id == run_id)
        return {
            "steps": s.execute(select(Step.episode_id, Step.index, Step.completion, Step.observation)
                               .where(Step.episode_id.in_(ids)).order_by(Step.episode_id, Step.index)).all(),
            "hops": s.execute(select(Hop.subject_id, Hop.step_index, Hop.hop, Hop.result)
                              .order_by(Hop.subject_id, Hop.step_index, Hop.hop)).all(),
            "events": s.execute(select(func.count()).select_from(Event)).scalar(),
            "parts": s.execute(select(func.count()).select_from(parts_table)).scalar(),
        }


def test_same_message_delivered_twice_writes_nothing_new(cluster):
    from megaflow.bench.floors import tasks_done, wait_for_worker

    settings, workers = cluster.settings, cluster.workers
    client = Client(settings)
    run_id = client.submit(spec(1, 2))
    client.wait(run_id, timeout=60)
    before = _snapshot(client, run_id)
    with client.session() as s:
        eid, exec_task_id = s.execute(select(Hop.subject_id, Hop.task_id).where(
            Hop.hop == "exec", Hop.step_index == 0)).first()
        ep_task_id = s.execute(select(Hop.task_id).where(Hop.subject_id == eid, Hop.hop == "agent.start")).scalar()
    app = client.app
    for w in ("env", "agent"):
        wait_for_worker(app, w)
    env_before, agent_before = tasks_done(app, "env"), tasks_done(app, "agent")
    # The very same messages again: same task ids, same arguments.
    app.signature("megaflow.hop.exec", args=(eid, 0), queue="env.it-host", exchange="megaflow",
                  routing_key="env.it-host").apply_async(task_id=exec_task_id)
    app.signature("megaflow.episode", args=(None, eid)).apply_async(task_id=ep_task_id)
    deadline = time.monotonic() + 30
    while tasks_done(app, "env") <= env_before or tasks_done(app, "agent") <= agent_before:
        assert time.monotonic() < deadline, "duplicates were not consumed"
        time.sleep(0.2)
    time.sleep(0.5)
    assert _snapshot(client, run_id) == before


def test_unknown_task_is_dead_lettered_not_crash_looping(cluster):
    settings, workers = cluster.settings, cluster.workers
    client = Client(settings)
    app = client.app
    from megaflow.bench.floors import wait_for_worker

    wait_for_worker(app, "agent")
    app.send_task("megaflow.no_such_task", args=(1,), queue="agent", exchange="megaflow", routing_key="agent")
    deadline = time.monotonic() + 30
    with app.connection_for_write() as conn:
        while True:
            _, count, _ = conn.default_channel.queue_declare("megaflow.dead", passive=True)
            if count >= 1:
                break
            assert time.monotonic() < deadline, "unknown task was not dead-lettered"
            time.sleep(0.2)
    assert workers["agent"].alive()
    # The worker keeps working after the poison message.
    run_id = client.submit(spec(1, 1))
    assert client.wait(run_id, timeout=60)["by_state"] == {"succeeded": 1}


def test_cancel_mid_run_ends_every_episode_and_closes_the_run(cluster):
    settings, workers = cluster.settings, cluster.workers
    client = Client(settings)
    run_id = client.submit(spec(6, 4, latency=0.2))
    deadline = time.monotonic() + 60
    while client.status(run_id)["steps"] < 5:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    client.cancel(run_id)
    st = client.wait(run_id, timeout=120)
    assert st["status"] == "cancelled"
    assert set(st["by_state"]) <= {"cancelled", "succeeded"} and st["by_state"].get("cancelled", 0) > 0
    assert sum(st["by_state"].values()) == 24
    events = client.events(run_id)
    assert events["run.done"] == 1 and events["group.done"] == 6
    from megaflow.db.models import SandboxRow

    with client.session() as s:
        live = s.execute(select(func.count()).select_from(SandboxRow).where(
            SandboxRow.run_id == run_id, SandboxRow.destroyed_at.is_(None))).scalar()
    assert live == 0, "cancelled episodes must release their sandboxes"
