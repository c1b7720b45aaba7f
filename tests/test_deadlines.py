"""Deadlines on every phase, time limits below the broker's consumer timeout, infra failures
retried with backoff and kept apart from the agent's — through real workers on RabbitMQ and PostgreSQL.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from megaflow import Client, Settings
from megaflow.app import make_app
from megaflow.db.models import Episode, Event, Hop
from megaflow.deadlines import max_phase_s, task_time_limits
from megaflow.watchdog import Watchdog

HOST = "dl-host"
ECHO = "```bash\necho {step}\n```"

pytestmark = pytest.mark.cluster(host=HOST, name="dl-", env={"MEGAFLOW_WORKER_CONCURRENCY": "6",
                                                                  "DOCKER_HOST": "unix:///nonexistent/docker.sock"})


@pytest.mark.parametrize("consumer_timeout", [600.0, 1800.0, 7200.0])
def test_every_task_has_time_limits_below_the_consumer_timeout(consumer_timeout, tmp_path):
    settings = Settings(data_dir=tmp_path, consumer_timeout_s=consumer_timeout)
    app = make_app(settings)
    megaflow_tasks = [t for name, t in app.tasks.items() if name.startswith("megaflow.")]
    assert len(megaflow_tasks) >= 9
    for task in megaflow_tasks:
        soft = task.soft_time_limit or app.conf.task_soft_time_limit
        hard = task.time_limit or app.conf.task_time_limit
        assert soft < hard < consumer_timeout, (task.name, soft, hard)
    limits = task_time_limits(settings)
    # A phase at its longest still ends before its hop's soft limit.
    assert max_phase_s(settings) < min(limits[n][0] for n in limits if n.startswith("megaflow.hop."))


def test_watchdog_reports_soft_and_hard_overruns():
    seen = []
    dog = Watchdog({"megaflow.hop.exec": (1.0, 2.0)}, exit_on_hard=False,
                   on_overrun=lambda name, tid, elapsed, which: seen.append((name, tid, which)))
    dog.started("t1", "megaflow.hop.exec")
    dog.started("t2", "megaflow.hop.exec", timelimit=(10.0, 5.0))  # the message's own limits win
    now = time.monotonic()
    assert dog.check(now + 0.5) == []
    assert dog.check(now + 1.5) == [("t1", "soft")]
    assert dog.check(now + 1.6) == []  # warned once
    assert dog.check(now + 2.5) == [("t1", "hard")]
    assert dog.check(now + 6.0) == [("t1", "hard"), ("t2", "soft")]
    dog.finished("t1")
    assert dog.check(now + 11.0) == [("t2", "hard")]
    assert ("megaflow.hop.exec", "t2", "hard") in seen


#: Retries and countdowns must arrive on both stacks: RabbitMQ and PostgreSQL, and the embedded one
#: (SQLite state and transport).
ON_BOTH_STACKS = pytest.mark.parametrize("cluster", [{"stack": "rabbitmq"}, {"stack": "embedded"}], indirect=True,
                                         ids=["rabbitmq", "embedded"])


def _spec(name: str, *, replies=(ECHO, "```bash\nsubmit\n```"), latency=0.0, limits=None, sandbox="local",
          setup=(), check="true") -> dict:
    return {"name": name, "model": {"type": "scripted", "replies": list(replies), "latency_s": latency},
            "sandbox": {"type": sandbox}, "limits": limits or {},
            "tasks": [{"instance_id": name, "instruction": "x", "check": check, "setup": list(setup)}]}


def _episode(client: Client, run_id: str) -> Episode:
    with client.session() as s:
        [ep] = s.execute(select(Episode).where(Episode.run_id == run_id)).scalars().all()
        s.expunge(ep)
    return ep


@pytest.mark.integration
@ON_BOTH_STACKS
def test_every_phase_has_a_deadline(cluster):
    settings = cluster.settings
    client = Client(settings)
    runs = {
        # Three setup commands of 1.5 s each do not fit one 3 s provisioning deadline.
        "provision": _spec("provision", setup=["sleep 1.5"] * 3, limits={"provision_timeout_s": 3}),
        # A model that takes 5 s, with 0.5 s per call and one retry.
        "model": _spec("model", latency=5.0, limits={"model_timeout_s": 0.5, "model_retries": 1,
                                                     "model_retry_backoff_s": 0.1}),
        # A 20 s command in an episode with 3 s left: cut at the episode's deadline, not at exec_timeout_s.
        "episode": _spec("episode", replies=["```bash\nsleep 20\n```"],
                         limits={"episode_timeout_s": 3, "exec_timeout_s": 60}),
        # Checks that outlive the evaluation deadline: reward 0, not a hung hop.
        "evaluate": _spec("evaluate", check="sleep 20", limits={"eval_timeout_s": 1}),
        # A plain command deadline: the agent sees exit code 124 and goes on.
        "exec": _spec("exec", replies=["```bash\nsleep 20\n```", "```bash\nsubmit\n```"],
                      limits={"exec_timeout_s": 1}),
    }
    t0 = time.monotonic()
    ids = {k: client.submit(v) for k, v in runs.items()}
    done_at = {}
    for phase, run_id in ids.items():
        client.wait(run_id, timeout=90)
        done_at[phase] = time.monotonic() - t0
    provision = _episode(client, ids["provision"])
    assert (provision.state, provision.exit_status) == ("infra_failed", "setup_failed")
    assert "deadline" in provision.error and provision.reward is None
    model = _episode(client, ids["model"])
    assert (model.state, model.exit_status) == ("infra_failed", "model_unavailable")
    assert "deadline" in model.error
    episode = _episode(client, ids["episode"])
    assert (episode.state, episode.exit_status) == ("failed", "time_limit")
    assert done_at["episode"] < 15, done_at
    evaluate = _episode(client, ids["evaluate"])
    assert (evaluate.state, evaluate.reward) == ("succeeded", 0.0)
    assert done_at["evaluate"] < 15, done_at
    exec_ = _episode(client, ids["exec"])
    assert (exec_.state, exec_.reward) == ("succeeded", 1.0)
    assert done_at["model"] < 20 and done_at["provision"] < 20, done_at


@pytest.mark.integration
@ON_BOTH_STACKS
def test_infra_failures_are_retried_with_backoff_and_kept_apart_from_agent_failures(cluster):
    settings = cluster.settings
    client = Client(settings)
    # No Docker engine: provisioning fails for the platform's reasons, three retries with backoff.
    infra = client.submit(_spec("nodocker", sandbox="docker"))
    # The agent's own failure: it never submits within its step limit.
    mixed = client.submit({
        "name": "mixed", "model": {"type": "scripted", "replies": ["```bash\nexit 1\n```"]},
        "sandbox": {"type": "local"}, "limits": {"max_steps": 1, "provision_timeout_s": 30},
        "rollouts": 2,
        "tasks": [{"instance_id": "agent-fails", "instruction": "x", "check": "true"},
                  {"instance_id": "setup-breaks", "instruction": "x", "check": "true", "setup": ["exit 3"]}]})
    t0 = time.monotonic()
    st = client.wait(infra, timeout=120)
    waited = time.monotonic() - t0
    ep = _episode(client, infra)
    assert (ep.state, ep.exit_status, ep.reward) == ("infra_failed", "provision_failed", None)
    with client.session() as s:
        hop = s.execute(select(Hop).where(Hop.subject_id == ep.id, Hop.hop == "provision")).scalar_one()
        retries = s.execute(select(Event).where(Event.kind == "hop.retry", Event.subject_id == ep.id)).all()
    assert len(retries) == 3 and hop.result["kind"] == "infra"  # the first try and three retries
    assert waited > 1.5  # backoff 1, 2, 4 s, each times a jitter of 0.5-1.5
    assert st["mean_reward"] is None and st["summary"]["mean_reward"] is None  # nothing done, nothing averaged

    st = client.wait(mixed, timeout=120)
    assert st["by_state"] == {"failed": 2, "infra_failed": 2}, st
    rows = client.results(mixed)
    by_task = {(r["instance_id"], r["state"], r["exit_status"], r["reward"]) for r in rows}
    assert by_task == {("agent-fails", "failed", "step_limit", -0.5), ("setup-breaks", "infra_failed",
                                                                        "setup_failed", None)}
    # Statistics count only what the agent did: the infra failures are neither rewarded nor averaged.
    assert st["summary"]["mean_reward"] == -0.5
    assert all(r["advantage"] is None for r in rows if r["state"] == "infra_failed")
