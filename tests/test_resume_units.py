"""`megaflow resume` on SQLite and the embedded broker (no workers): what it records."""

from __future__ import annotations

from sqlalchemy import select, update

from megaflow import Client, RunSpec, Settings
from megaflow.db import states
from megaflow.db.engine import session_scope
from megaflow.db.models import Episode, Event
from megaflow.ops.stats import failures_by_kind


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
