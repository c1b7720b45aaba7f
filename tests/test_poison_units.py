"""A decision reads any previous result, even one without `hop` or `step` (SQLite, no services)."""

from __future__ import annotations

from sqlalchemy import select, update

from megaflow import Client, RunSpec, Settings
from megaflow.db import states
from megaflow.db.engine import session_scope
from megaflow.db.models import Episode
from megaflow.hops.episode import Driver, normalized
from megaflow.runtime import Runtime


def test_normalized_fills_in_hop_and_step():
    assert normalized(None) == {"hop": "start", "step": 0}
    assert normalized({"hop": "exec", "step": "3", "x": 1}) == {"hop": "exec", "step": 3, "x": 1}
    # What the ledger's own poison check used to record: the decision raised KeyError('step') on it.
    old = {"error": "hop delivered 6 times", "kind": "infra"}
    assert normalized(old) == {**old, "hop": "unknown", "step": 0}
    assert normalized({"hop": "exec", "step": None})["step"] == 0


def test_a_result_without_hop_or_step_ends_the_episode_infra_failed(tmp_path, sqlite_url):
    settings = Settings(data_dir=tmp_path, database_url=sqlite_url)
    spec = {"name": "p", "model": {"type": "scripted", "replies": ["x"]}, "sandbox": {"type": "memory"},
            "tasks": [{"instance_id": "t", "instruction": "i", "check": "true"}]}
    run_id, _ = Client(settings)._record(RunSpec.parse(spec))
    rt = Runtime(settings)
    with session_scope(sqlite_url) as s:
        eid = s.execute(select(Episode.id).where(Episode.run_id == run_id)).scalar_one()
        s.execute(update(Episode).where(Episode.id == eid).values(state=states.RUNNING))
    rt.warm(eid)  # spec and task cached first, as the episode task does (SQLite: one writer)
    with rt.session() as s:
        driver = Driver(rt, s, eid)
        decision = driver.decide({"error": "hop delivered 6 times", "kind": "infra"})
        driver.save()
    assert decision["final"] and decision["summary"]["state"] == states.INFRA_FAILED
