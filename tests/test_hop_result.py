"""A decision reads any previous result, even one without `hop` or `step` (SQLite, no services)."""

from __future__ import annotations

from sqlalchemy import select, update

from megaflow import Client, RunSpec, Settings
from megaflow.db import states
from megaflow.db.engine import session_scope
from megaflow.db.models import Episode
from megaflow.contract import HopResult
from megaflow.hops.episode import driver_for
from megaflow.runtime import Runtime


def test_a_received_result_always_has_a_hop_and_a_step():
    assert HopResult.received(None) == HopResult(hop="start", step=0)
    assert HopResult.received({"hop": "exec", "step": "3"}) == HopResult(hop="exec", step=3)
    # What the ledger's own poison check used to record: the decision raised KeyError('step') on it.
    old = HopResult.received({"error": "hop delivered 6 times", "kind": "infra"})
    assert (old.hop, old.step, old.error, old.exit_status) == ("unknown", 0, "hop delivered 6 times", "hop_crashed")
    assert HopResult.received({"hop": "exec", "step": None}).step == 0
    # Anything else malformed is a failed hop the decision ends the episode on, not a crash.
    odd = HopResult.received({"hop": "teleport", "step": "x"})
    assert odd.failed and odd.hop == "unknown" and "malformed hop result" in odd.error


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
        driver = driver_for(rt, s, eid)
        decision = driver.decide(HopResult.received({"error": "hop delivered 6 times", "kind": "infra"}))
        driver.rows.save()
    assert decision.final is not None and decision.final.state == states.INFRA_FAILED


def test_an_episode_task_that_fails_after_its_decision_ends_the_episode(tmp_path, sqlite_url, monkeypatch):
    """E.g. the next hop could not be sent (the broker stayed down past the publish retries)."""
    from megaflow.app import make_app
    from megaflow.db.models import Step
    from megaflow.hops import episode as episode_mod

    settings = Settings(data_dir=tmp_path, database_url=sqlite_url)
    app = make_app(settings)
    spec = {"name": "p", "model": {"type": "scripted", "replies": ["x"]}, "sandbox": {"type": "memory"},
            "tasks": [{"instance_id": "t", "instruction": "i", "check": "true"}]}
    run_id, _ = Client(settings)._record(RunSpec.parse(spec))
    with session_scope(sqlite_url) as s:
        eid = s.execute(select(Episode.id).where(Episode.run_id == run_id)).scalar_one()
        s.execute(update(Episode).where(Episode.id == eid).values(state=states.RUNNING))
        s.add(Step(episode_id=eid, index=0, messages_in=[], completion="```bash\necho hi\n```"))

    def broker_gone(task, sig):
        raise ConnectionError("broker unreachable after every publish retry")

    monkeypatch.setattr(episode_mod, "continue_with", broker_gone)
    task = app.tasks["megaflow.episode"]
    task.push_request(id="t1", chord={"task": "megaflow.group.done"})
    try:
        summary = task.run({"hop": "generate", "step": 0}, eid)
    finally:
        task.pop_request()
    assert summary["state"] == states.INFRA_FAILED and summary["exit_status"] == "agent_crashed"
    with session_scope(sqlite_url) as s:
        assert "broker unreachable" in s.get(Episode, eid).error
