"""Bounded staleness (issue 18, point 3) without services: the admission rule, the turn
rule, and admission holding an rl run's later batches in process (SQLite, the scripted
model, the memory sandbox) until a publication lets them in."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from megaflow import Settings
from megaflow.contract import HopResult
from megaflow.db import states
from megaflow.db.models import Episode, Step
from megaflow.inprocess import InProcessRunner
from megaflow.model import policy as policies
from megaflow.scheduler import admission, staleness
from megaflow.spec import RunSpec
from tests.test_rl_policy import full_checkpoint

SUBMIT = "policy v{version}\n```bash\nsubmit\n```"


@pytest.mark.parametrize("start, group, per_batch, bound, needed", [
    (0, 0, 1, 0, 0), (0, 1, 1, 0, 1), (0, 5, 2, 0, 2),    # sync: batch b waits for version v0 + b
    (3, 4, 2, 0, 5),                                       # counted from the version at submission
    (0, 3, 1, 1, 2), (0, 1, 1, 1, 0), (0, 9, 3, 2, 1),     # async k: k batches ahead of the trainer
])
def test_the_admission_rule(start, group, per_batch, bound, needed):
    assert staleness.need(start, group, per_batch, bound) == needed
    assert staleness.admissible(needed, needed) and not staleness.admissible(needed - 1, needed)


def test_the_turn_rule():
    assert staleness.turn_within(5, 5, 0) and not staleness.turn_within(5, 4, 0)
    assert staleness.turn_within(5, 4, 1) and not staleness.turn_within(5, 3, 1)
    assert staleness.turn_within(9, 0, None)  # async without a bound: any lag
    assert staleness.turn_within(9, None, 0)  # a backend following no policy says nothing


@pytest.fixture
def runner(tmp_path, sqlite_url):
    return InProcessRunner(Settings(data_dir=tmp_path, database_url=sqlite_url))


def spec(rl: dict, groups: int = 3) -> dict:
    return {"name": "rl", "model": {"type": "scripted", "replies": [SUBMIT]}, "sandbox": {"type": "memory"},
            "tasks": [{"instance_id": f"t{i}", "instruction": "x", "check": "true"} for i in range(groups)],
            "rl": rl}


def episodes(runner, run_id):
    with runner.rt.session() as s:
        return s.execute(select(Episode.id, Episode.state, Episode.wait_reason).where(Episode.run_id == run_id)
                         .order_by(Episode.seq)).all()


def versions(runner, episode_id):
    with runner.rt.session() as s:
        return s.execute(select(Step.policy_version, Step.completion).where(Step.episode_id == episode_id)).all()


def publish(runner, tmp_path) -> list[str]:
    """What `Client.publish_policy` does, but the start messages: the ids of the episodes it admits.

    (In process nothing is parked to send: the runner carries on with `run_episode`.)
    """
    policies.publish(runner.rt.session, str(full_checkpoint(tmp_path, f"ckpt{len(list(tmp_path.iterdir()))}")))
    with runner.rt.session() as s:
        return [a["episode_id"] for a in admission.admit_published(s, runner.settings, "default")]


def test_sync_holds_the_next_batch_until_the_trainer_publishes(runner, tmp_path):
    run_id, _ = runner.client._record(RunSpec.parse(spec({"mode": "sync", "groups_per_batch": 1})))
    (e0, _, _), (e1, _, _), (e2, _, _) = episodes(runner, run_id)
    assert runner.run_episode(e0).state == states.SUCCEEDED
    assert versions(runner, e0) == [(0, "policy v0\n```bash\nsubmit\n```")]
    for eid in (e1, e2):
        assert runner.decide(eid, HopResult(hop="start")).park
    held = {eid: why for eid, _, why in episodes(runner, run_id)}
    assert held[e1] == "policy default: waiting for version 1"
    assert held[e2] == "policy default: waiting for version 2"

    assert publish(runner, tmp_path) == [e1]
    rows = {eid: (state, why) for eid, state, why in episodes(runner, run_id)}
    assert rows[e1] == (states.PENDING, None) and rows[e2][0] == states.WAITING  # one batch per version
    assert runner.run_episode(e1, HopResult(hop="admit")).state == states.SUCCEEDED
    assert versions(runner, e1) == [(1, "policy v1\n```bash\nsubmit\n```")]


def test_async_runs_k_batches_ahead(runner, tmp_path):
    run_id, _ = runner.client._record(RunSpec.parse(spec({"mode": "async", "max_staleness": 1}, groups=4)))
    ids = [eid for eid, _, _ in episodes(runner, run_id)]
    assert not runner.decide(ids[0], HopResult(hop="start")).park
    assert not runner.decide(ids[1], HopResult(hop="start")).park  # one batch ahead of version 0
    assert runner.decide(ids[2], HopResult(hop="start")).park
    assert publish(runner, tmp_path) == [ids[2]]
    assert [state for _, state, _ in episodes(runner, run_id)][2] == states.PENDING  # v1 lets batch 2 in
    assert runner.decide(ids[3], HopResult(hop="start")).park  # batch 3 waits for v2


def test_a_run_without_a_bound_never_waits(runner):
    run_id, _ = runner.client._record(RunSpec.parse(spec({"mode": "async"}, groups=3)))
    assert all(not runner.decide(eid, HopResult(hop="start")).park for eid, _, _ in episodes(runner, run_id))


def test_the_repair_sweep_admits_what_a_dead_publisher_left_waiting(runner, tmp_path):
    run_id, _ = runner.client._record(RunSpec.parse(spec({"mode": "sync"}, groups=2)))
    e0, e1 = (eid for eid, _, _ in episodes(runner, run_id))
    assert runner.run_episode(e0).state == states.SUCCEEDED
    assert runner.decide(e1, HopResult(hop="start")).park
    # The version is recorded, but its publisher died before admitting anything.
    policies.publish(runner.rt.session, str(full_checkpoint(tmp_path)))
    with runner.rt.session() as s:
        assert [a["episode_id"] for a in admission.repair(s, runner.settings)] == [e1]
