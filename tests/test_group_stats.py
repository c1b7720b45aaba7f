"""A group's callback writes each episode's GRPO advantage, and none for infra failures."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from sqlalchemy import select, update

from megaflow import Client, Settings
from megaflow.db.models import Episode, Event
from megaflow.hops.groups import group_done_task
from megaflow.spec import RunSpec


def test_group_done_writes_advantages_per_episode(tmp_path, sqlite_url):
    client = Client(Settings(data_dir=tmp_path, database_url=sqlite_url, broker_url="memory://"))
    spec = RunSpec.parse({"rollouts": 4, "tasks": [{"instance_id": "t", "instruction": "x", "check": "true"}],
                          "sandbox": {"type": "memory"}})
    run_id, _ = client._record(spec)
    outcomes = [("succeeded", 1.0), ("failed", 0.0), ("succeeded", 1.0), ("infra_failed", None)]
    with client.session() as s:
        eps = s.execute(select(Episode.id, Episode.group_id).where(Episode.run_id == run_id)
                        .order_by(Episode.sample_index)).all()
        for (eid, _), (state, reward) in zip(eps, outcomes):
            s.execute(update(Episode).where(Episode.id == eid).values(state=state, reward=reward))
    group_id = eps[0].group_id
    task = SimpleNamespace(app=client.app, request=SimpleNamespace(id="g1", retries=0))
    out = group_done_task(task, [], group_id)
    assert out["n"] == 3 and out["mean"] == pytest.approx(2 / 3)
    with client.session() as s:
        adv = dict(s.execute(select(Episode.id, Episode.advantage).where(Episode.run_id == run_id)).all())
        kinds = s.execute(select(Event.kind).where(Event.subject_id == group_id)).scalars().all()
    std = (2 / 9) ** 0.5
    assert adv[eps[0].id] == pytest.approx((1 - 2 / 3) / (std + 1e-6))
    assert adv[eps[1].id] == pytest.approx((0 - 2 / 3) / (std + 1e-6))
    assert adv[eps[2].id] == adv[eps[0].id]
    assert adv[eps[3].id] is None  # an infra failure is not the policy's doing
    assert kinds == ["group.done"]
    # Redelivered, the callback replays its recorded result and writes nothing twice.
    assert group_done_task(task, [], group_id) == out
