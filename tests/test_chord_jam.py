"""A chord never jams: a failed member still fires the body; a run left open is flagged and closed.

SQLite only (no services). The same story with real workers and a SIGKILL is
tests/test_poison_path.py.
"""

from __future__ import annotations

import datetime as dt
import time
from types import SimpleNamespace

import pytest
from celery import Celery
from sqlalchemy import select, update

from megaflow import Client, RunSpec, Settings
from megaflow.chord_backend import SQLChordBackend
from megaflow.cli.runs import status_table
from megaflow.db import states
from megaflow.db.engine import session_scope
from megaflow.db.models import Episode, Event, Hop, RolloutGroup, Run, utcnow
from megaflow.db.schema import upgrade
from megaflow.db import ledger
from megaflow.runtime import Runtime
from megaflow.scheduler import chords


def test_a_failed_member_still_fires_the_body_and_is_recorded(sqlite_url):
    upgrade(sqlite_url)
    app = Celery("t", broker="memory://")
    app.conf.task_always_eager = True
    fired = []

    @app.task(name="megaflow.group.done", shared=False)
    def body(results, group_id):
        fired.append((results, group_id))

    backend = SQLChordBackend(app=app, url=sqlite_url)
    backend.set_chord_size("g", 3)
    chord_body = dict(app.signature("megaflow.group.done", args=("grp",)))
    for i, state in enumerate(("SUCCESS", "FAILURE", "SUCCESS")):
        req = SimpleNamespace(group="g", id=f"m{i}", group_index=i, chord=chord_body)
        result = KeyError("step") if state == "FAILURE" else {"episode_id": f"e{i}"}
        backend.on_chord_part_return(req, state, result)
    # Celery's own way (a ChordError from outside an exception) crashed here and sent nothing.
    assert len(fired) == 1
    results, group_id = fired[0]
    assert group_id == "grp" and results[0] == {"episode_id": "e0"} and results[2] == {"episode_id": "e2"}
    assert results[1]["state"] == "FAILURE" and results[1]["task_id"] == "m1"
    with session_scope(sqlite_url) as s:
        [event] = s.execute(select(Event).where(Event.kind == "chord.error")).scalars().all()
        assert event.subject_id == "grp" and event.data["member"] == "m1"


def test_a_failed_member_ends_its_episode_before_the_chord_closes(tmp_path, sqlite_url):
    """A hop given up past every containment: its episode must not stay running behind a closed run."""
    upgrade(sqlite_url)
    client = Client(Settings(data_dir=tmp_path, database_url=sqlite_url))
    spec = {"name": "failed-member", "model": {"type": "scripted", "replies": ["x"]}, "sandbox": {"type": "memory"},
            "tasks": [{"instance_id": "t", "instruction": "i", "check": "true"}]}
    run_id, _ = client._record(RunSpec.parse(spec))
    with session_scope(sqlite_url) as s:
        [eid] = s.execute(select(Episode.id).where(Episode.run_id == run_id)).scalars().all()
        s.execute(update(Episode).where(Episode.id == eid).values(state=states.RUNNING))
    app = Celery("t", broker="memory://")
    app.conf.task_always_eager = True
    fired = []

    @app.task(name="megaflow.group.done", shared=False)
    def body(results, group_id):
        fired.append(results)

    backend = SQLChordBackend(app=app, url=sqlite_url)
    backend.set_chord_size("g1", 1)
    req = SimpleNamespace(group="g1", id="m0", group_index=0, args=(eid,), task="megaflow.episode",
                          chord=dict(app.signature("megaflow.group.done", args=("grp",))))
    backend.on_chord_part_return(req, "FAILURE", OSError("publish failed"))
    assert len(fired) == 1
    with session_scope(sqlite_url) as s:
        ep = s.get(Episode, eid)
        assert (ep.state, ep.exit_status) == (states.INFRA_FAILED, "hop_crashed")
        assert "megaflow.episode failed" in ep.error and ep.finished_at is not None
        assert s.execute(select(Event).where(Event.kind == "episode.ended", Event.subject_id == eid)).scalar()


def _run_with_ended_episodes(tmp_path, sqlite_url, ended_ago_s: float) -> tuple[Settings, str]:
    settings = Settings(data_dir=tmp_path, database_url=sqlite_url, host="h")
    client = Client(settings)
    spec = {"name": "jam", "rollouts": 2, "model": {"type": "scripted", "replies": ["x"]},
            "sandbox": {"type": "memory"},
            "tasks": [{"instance_id": f"t{i}", "instruction": "i", "check": "true"} for i in range(2)]}
    run_id, _ = client._record(RunSpec.parse(spec))
    ended = utcnow() - dt.timedelta(seconds=ended_ago_s)
    with session_scope(sqlite_url) as s:
        s.execute(update(Run).where(Run.id == run_id).values(status="running"))
        ids = s.execute(select(Episode.id).where(Episode.run_id == run_id).order_by(Episode.seq)).scalars().all()
        for k, eid in enumerate(ids):
            state = states.INFRA_FAILED if k == 0 else states.SUCCEEDED
            s.execute(update(Episode).where(Episode.id == eid).values(state=state, reward=1.0 if k else None,
                                                                      finished_at=ended))
    return settings, run_id


def _render(table) -> str:
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def test_a_run_whose_episodes_all_ended_is_flagged_then_closed_by_the_repair(db, request, tmp_path):
    if db == "sqlite":
        sqlite_url = request.getfixturevalue("sqlite_url")
    else:
        sqlite_url = request.getfixturevalue("pg_url")
        upgrade(sqlite_url)
    settings, run_id = _run_with_ended_episodes(tmp_path, sqlite_url, ended_ago_s=chords.STALE_S + 60)
    rt = Runtime(settings)
    with session_scope(sqlite_url) as s:
        assert chords.chord_unclosed(s, run_id)
        [found] = chords.unclosed_runs(s)
    shown = Client(settings).status(run_id)
    assert shown["chord_unclosed"] is True
    assert "chord not closed" in _render(status_table(shown))
    assert found["run_id"] == run_id and len(found["groups"]) == 2
    assert chords.close_unclosed(rt.session) == [run_id]
    with session_scope(sqlite_url) as s:
        run = s.get(Run, run_id)
        assert run.status == "finished" and run.summary["by_state"] == {"infra_failed": 1, "succeeded": 3}
        assert set(s.execute(select(RolloutGroup.status).where(RolloutGroup.run_id == run_id)).scalars()) == {
            "finished"}
        assert not chords.chord_unclosed(s, run_id)
        # A body that arrives late replays what the repair recorded under its own key.
        assert ledger.recorded(s, run_id, 0, "run.done")["by_state"] == run.summary["by_state"]
        assert s.execute(select(Hop).where(Hop.hop == "group.done")).scalars().all().__len__() == 2
        assert s.execute(select(Event).where(Event.kind == "chord.repaired")).scalars().all()
    assert chords.close_unclosed(rt.session) == []
    assert Client(settings).status(run_id)["chord_unclosed"] is False


def test_a_run_still_finishing_is_not_flagged(tmp_path, sqlite_url):
    settings, run_id = _run_with_ended_episodes(tmp_path, sqlite_url, ended_ago_s=5)
    with session_scope(sqlite_url) as s:
        assert not chords.chord_unclosed(s, run_id)
        eid = s.execute(select(Episode.id).where(Episode.run_id == run_id)).scalars().first()
        s.execute(update(Episode).where(Episode.id == eid).values(state=states.RUNNING))
        assert not chords.chord_unclosed(s, run_id, stale_s=0)


def test_the_repair_chores_run_at_the_first_heartbeat():
    """Not a minute after the env worker starts: one restarted every few seconds would never run them."""
    import contextlib
    import threading

    ran = threading.Event()

    @contextlib.contextmanager
    def no_db():
        yield SimpleNamespace(execute=lambda *a, **kw: SimpleNamespace(rowcount=1))

    from megaflow.scheduler.hosts import HeartbeatThread

    beat = HeartbeatThread(no_db, "h", 0.05, chores=ran.set, every=1000)
    beat.start()
    try:
        assert ran.wait(5.0)
    finally:
        beat.stop()


def test_slow_chores_do_not_delay_the_heartbeat():
    """A repair stuck on a busy database must not make a healthy host read as dead."""
    import contextlib
    import threading

    beats, release = [], threading.Event()

    @contextlib.contextmanager
    def counting_db():
        yield SimpleNamespace(execute=lambda *a, **kw: beats.append(1) or SimpleNamespace(rowcount=1))

    from megaflow.scheduler.hosts import HeartbeatThread

    beat = HeartbeatThread(counting_db, "h", 0.05, chores=lambda: release.wait(10), every=2)
    beat.start()
    try:
        deadline = time.monotonic() + 5
        while len(beats) < 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(beats) >= 10, f"{len(beats)} beats while the chores hung"
        assert sum(t.name == "megaflow-chores-h" and t.is_alive() for t in threading.enumerate()) == 1, \
            "one round of chores at a time"
    finally:
        release.set()
        beat.stop()
