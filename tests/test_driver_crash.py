"""A bug while deciding ends the episode as a recorded infra failure, not a stuck episode."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megaflow import Client, Settings
from megaflow.db.models import Episode
from megaflow.hops import episode as episode_mod


@pytest.fixture
def crashing(tmp_path, sqlite_url, monkeypatch):
    """A recorded one-episode run whose every decision raises: (client, episode id)."""
    settings = Settings(data_dir=tmp_path, database_url=sqlite_url, broker_url="memory://")
    client = Client(settings)
    run_id, _ = client._record(client_spec())
    with client.session() as s:
        eid = s.query(Episode.id).filter_by(run_id=run_id).scalar()

    def boom(self, prev):
        raise ZeroDivisionError("scaffold bug")

    monkeypatch.setattr(episode_mod.Driver, "decide", boom)
    return client, eid


def test_crashing_decision_ends_the_episode(crashing):
    client, eid = crashing
    task = SimpleNamespace(app=client.app, request=SimpleNamespace(id="t1", retries=0, chord=None))
    summary = episode_mod.episode_task(task, None, eid)
    assert summary["state"] == "infra_failed" and summary["exit_status"] == "agent_crashed"
    with client.session() as s:
        ep = s.get(Episode, eid)
        assert ep.state == "infra_failed" and "ZeroDivisionError" in ep.error
    # Redelivered, the same message replays the recorded ending.
    assert episode_mod.episode_task(task, None, eid) == summary


def client_spec():
    from megaflow.spec import RunSpec

    return RunSpec.parse({"tasks": [{"instance_id": "t", "instruction": "x", "check": "true"}],
                          "sandbox": {"type": "memory"}})


def test_an_end_whose_slots_cannot_be_given_back_still_returns_to_its_chord(crashing, monkeypatch):
    """Slots are given back after the ending decision commits; if that fails, the episode's
    summary still reaches its chord (the repair sweep frees the slots later)."""
    from megaflow.scheduler import admission

    client, eid = crashing

    def lost(rt, episode_id):
        raise ConnectionError("database went away")

    monkeypatch.setattr(admission, "after_end", lost)
    task = SimpleNamespace(app=client.app, request=SimpleNamespace(id="t2", retries=0, chord=None))
    summary = episode_mod.episode_task(task, None, eid)
    assert summary["episode_id"] == eid and summary["state"] == "infra_failed"
