"""Env hops under redelivery: a computed reward is kept, a lost sandbox is rebuilt, one sandbox per episode.

The env hops' task bodies run in-process on SQLite and the local and docker sandboxes; a
"worker death" is an exception thrown where the worker would have died, and the
redelivery is the same task id run again (as RabbitMQ redelivers it).
"""

from __future__ import annotations

import shutil
import uuid
from types import SimpleNamespace

import pytest
from conftest import docker_engine, need
from sqlalchemy import select, update

from megaflow import Client, RunSpec, Settings
from megaflow.app import make_app
from megaflow.db import states
from megaflow.db.engine import session_scope
from megaflow.db.models import Episode, Event, Hop, SandboxRow, Step
from megaflow.db import ledger
from megaflow.hops import base
from megaflow.hops.env_sandbox import obtain
from megaflow.reaper import sandbox_labels
from megaflow.runtime import get_runtime
from megaflow.sandbox.base import SandboxConfig

pytestmark = pytest.mark.integration

HOST = f"kept-{uuid.uuid4().hex[:8]}"  # its own: never another test's sandboxes


class WorkerDied(BaseException):
    """Where a SIGKILL would have hit."""


@pytest.fixture(params=["local", "docker"])
def kind(request, monkeypatch):
    if request.param == "local":
        need("bubblewrap", shutil.which("bwrap") is not None, "apt-get install bubblewrap")
        return "local"
    docker_engine(monkeypatch)
    return "docker"


@pytest.fixture
def world(tmp_path, sqlite_url, kind):
    settings = Settings(data_dir=tmp_path, database_url=sqlite_url, host=HOST)
    app = make_app(settings)
    spec = {"name": "kept", "model": {"type": "scripted", "replies": ["x"]}, "sandbox": {"type": kind},
            "tasks": [{"instance_id": "t", "instruction": "i", "check": "grep -q hi f.txt"}]}
    run_id, _ = Client(settings)._record(RunSpec.parse(spec))
    with session_scope(sqlite_url) as s:
        eid = s.execute(select(Episode.id).where(Episode.run_id == run_id)).scalar_one()
    w = SimpleNamespace(app=app, rt=get_runtime(app), url=sqlite_url, eid=eid, run_id=run_id, kind=kind)
    backend = w.rt.backend(kind)
    try:
        assert call(w, "provision", 0, "p0")["host"] == HOST
        with session_scope(sqlite_url) as s:
            s.execute(update(Episode).where(Episode.id == eid).values(state=states.RUNNING))
            for i, action in enumerate(("echo hi > f.txt", "cat f.txt")):
                s.add(Step(episode_id=eid, index=i, messages_in=[], action=action))
        yield w
    finally:
        for sandbox_id in backend.list_ids({"megaflow.host": HOST}):  # never leak, even on failure
            backend.destroy(sandbox_id)


def call(w, hop: str, step: int, task_id: str) -> dict:
    """One delivery of an env hop's message."""
    task = w.app.tasks[f"megaflow.hop.{hop}"]
    task.push_request(id=task_id, retries=0, delivery_info={})
    try:
        return task.run(w.eid, step)
    finally:
        task.pop_request()


def episode(w) -> Episode:
    with session_scope(w.url) as s:
        ep = s.get(Episode, w.eid)
        s.expunge(ep)
    return ep


def live(w) -> list[str]:
    with session_scope(w.url) as s:
        return list(s.execute(select(SandboxRow.id).where(SandboxRow.episode_id == w.eid,
                                                          SandboxRow.destroyed_at.is_(None))).scalars())


def test_a_reward_computed_before_a_worker_death_is_kept(world, monkeypatch):
    w = world
    assert call(w, "exec", 0, "x0")["exit_code"] == 0
    with session_scope(w.url) as s:
        s.execute(update(Episode).where(Episode.id == w.eid).values(state=states.EVALUATING))
    finish = ledger.finish

    def die(*a, **kw):
        raise WorkerDied()

    # The evaluation ran to its end; the worker dies before the reward is recorded.
    monkeypatch.setattr(base.ledger, "finish", die)
    with pytest.raises(WorkerDied):
        call(w, "evaluate", 1, "ev")
    monkeypatch.setattr(base.ledger, "finish", finish)
    # Redelivered: the sandbox is still there (it used to be destroyed first: "No such container").
    result = call(w, "evaluate", 1, "ev")
    assert result.get("reward") == 1.0, result
    assert episode(w).reward == 1.0
    assert live(w) == [], "the sandbox is destroyed once the reward is recorded"
    # Again (the worker died before its acknowledgement): the recorded result, sandbox or not.
    assert call(w, "evaluate", 1, "ev") == result


def test_a_hop_whose_sandbox_is_gone_gets_a_rebuilt_one(world):
    w = world
    assert call(w, "exec", 0, "x0")["exit_code"] == 0
    gone = episode(w).sandbox_id
    w.rt.backend(w.kind).destroy(gone)  # lost: reaped, released by a racing hop, the engine restarted
    w.rt.forget_sandbox(gone)
    result = call(w, "exec", 1, "x1")
    assert result.get("exit_code") == 0 and "error" not in result, result
    with session_scope(w.url) as s:
        assert s.get(Step, (w.eid, 1)).observation.strip() == "hi"  # step 0 was replayed first
        [rebuilt] = s.execute(select(Event.data).where(Event.kind == "episode.rebuilt")).scalars().all()
        assert s.get(SandboxRow, gone).state == "destroyed"
    assert rebuilt["replaces"] == gone and rebuilt["replayed"] == 1
    assert live(w) == [episode(w).sandbox_id] != [gone]
    with session_scope(w.url) as s:
        s.execute(update(Episode).where(Episode.id == w.eid).values(state=states.EVALUATING))
    w.rt.backend(w.kind).destroy(episode(w).sandbox_id)
    assert call(w, "evaluate", 2, "ev")["reward"] == 1.0


def test_a_redelivered_provision_leaves_one_sandbox(world):
    """What a killed provision left (a recorded sandbox, a claim row, an unrecorded one) goes first."""
    w = world
    backend = w.rt.backend(w.kind)
    first = episode(w).sandbox_id
    ghost = backend.create(SandboxConfig(type=w.kind), sandbox_labels(HOST, w.run_id, w.eid)).id
    with session_scope(w.url) as s:
        s.add(SandboxRow(id="claim-dead", backend=w.kind, host=HOST, episode_id=w.eid, state="creating"))
        s.execute(update(Episode).where(Episode.id == w.eid).values(sandbox_id=None))
        s.execute(update(Hop).where(Hop.subject_id == w.eid, Hop.hop == "provision").values(status="started"))
    call(w, "provision", 0, "p0")  # the redelivery
    now = episode(w).sandbox_id
    assert now not in (None, first, ghost)
    assert live(w) == [now]
    assert backend.list_ids({"megaflow.host": HOST}) == [now]
    # A second sandbox for the same episode replaces the first (one per episode per host).
    ep = SimpleNamespace(id=w.eid, run_id=w.run_id, task_instance_id=episode(w).task_instance_id)
    sb, _ = obtain(w.rt, ep, HOST)
    assert backend.list_ids({"megaflow.host": HOST}) == [sb.id] and live(w) == [sb.id]


def test_the_release_of_an_episode_that_never_recorded_a_sandbox_clears_its_leftovers(world):
    """Its provision's deliveries were killed, then it was poisoned: what they made must not outlive its slot."""
    w = world
    backend = w.rt.backend(w.kind)
    ghost = backend.create(SandboxConfig(type=w.kind), sandbox_labels(HOST, w.run_id, w.eid)).id
    with session_scope(w.url) as s:
        s.execute(update(Episode).where(Episode.id == w.eid).values(sandbox_id=None, state=states.INFRA_FAILED))
    call(w, "release", 0, "r0")
    assert backend.list_ids({"megaflow.host": HOST}) == [] and ghost not in live(w)
