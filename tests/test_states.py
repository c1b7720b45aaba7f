"""The episode state machine (`megaflow.db.states`): its edges, compare-and-set moves, terminal states that
stick."""

from __future__ import annotations

import pytest

from megaflow.db import states
from megaflow.db.engine import session_scope
from megaflow.db.models import Episode, RolloutGroup, Run, TaskInstance


def test_edges_follow_the_documented_machine():
    assert states.can_move("pending", "provisioning")
    assert states.can_move("running", "evaluating")
    assert states.can_move("evaluating", "succeeded")
    assert not states.can_move("pending", "succeeded")
    assert not states.can_move("succeeded", "running")
    for terminal in states.TERMINAL:
        assert states.TRANSITIONS[terminal] == frozenset()
    assert states.DONE == {"succeeded", "failed"}
    assert "infra_failed" not in states.DONE


def _episode(url: str) -> str:
    with session_scope(url) as s:
        run = Run(id="r1", name="r", spec={})
        ti = TaskInstance(id="t1", run_id="r1", instance_id="i", kind="terminal", data={})
        g = RolloutGroup(id="g1", run_id="r1", task_instance_id="t1", index=0, size=1)
        ep = Episode(id="e1", seq=1, run_id="r1", group_id="g1", task_instance_id="t1", sample_index=0)
        for row in (run, ti, g, ep):  # no ORM relationships: insert parents first
            s.add(row)
            s.flush()
    return "e1"


def test_move_is_compare_and_set(sqlite_url):
    eid = _episode(sqlite_url)
    with session_scope(sqlite_url) as s:
        assert states.move(s, eid, "provisioning")
        # A second delivery of the same move changes nothing.
        assert not states.move(s, eid, "provisioning")
        assert not states.move(s, eid, "succeeded")  # not an edge from provisioning
        assert states.move(s, eid, "running")
    with session_scope(sqlite_url) as s:
        ep = s.get(Episode, eid)
        assert ep.state == "running" and ep.started_at is not None


def test_terminal_sets_finished_at_and_sticks(sqlite_url):
    eid = _episode(sqlite_url)
    with session_scope(sqlite_url) as s:
        assert states.move(s, eid, "cancelled")
        assert not states.move(s, eid, "provisioning")
    with session_scope(sqlite_url) as s:
        assert s.get(Episode, eid).finished_at is not None


def test_unknown_state_is_refused(sqlite_url):
    eid = _episode(sqlite_url)
    with session_scope(sqlite_url) as s, pytest.raises(states.InvalidTransition):
        states.move(s, eid, "exploded")
