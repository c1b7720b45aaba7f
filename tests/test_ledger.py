"""The idempotency ledger and run_hop: a redelivered hop writes nothing new."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from celery.exceptions import Ignore

from megaflow.config import Settings
from megaflow.db.engine import session_scope
from megaflow.db.models import Event
from megaflow.db import ledger
from megaflow.hops.base import run_hop
from megaflow.runtime import Runtime


def test_claim_outcomes(sqlite_url):
    with session_scope(sqlite_url) as s:
        assert ledger.claim(s, "e", 0, "exec", "task-a").status == ledger.NEW
    with session_scope(sqlite_url) as s:
        # Same message again (redelivery after a crash): take over.
        assert ledger.claim(s, "e", 0, "exec", "task-a").status == ledger.NEW
        # Another lineage's message for the same hop: busy, drop it.
        assert ledger.claim(s, "e", 0, "exec", "task-b").status == ledger.BUSY
        assert ledger.finish(s, "e", 0, "exec", {"ok": 1})
        assert not ledger.finish(s, "e", 0, "exec", {"ok": 2}), "finish is compare-and-set"
    with session_scope(sqlite_url) as s:
        c = ledger.claim(s, "e", 0, "exec", "task-b")
        assert (c.status, c.result) == (ledger.DONE, {"ok": 1})


def _rt(tmp_path, url):
    return Runtime(Settings(data_dir=tmp_path, database_url=url))


def test_run_hop_twice_does_the_work_once(tmp_path, sqlite_url):
    rt = _rt(tmp_path, sqlite_url)
    calls = []

    def work(_ctx):
        calls.append(1)

        def write(s):
            s.add(Event(kind="side.effect"))
        return {"n": len(calls)}, write

    req = SimpleNamespace(id="t1", retries=0)
    assert run_hop(rt, req, ("e", 1, "exec"), work) == {"n": 1}
    assert run_hop(rt, req, ("e", 1, "exec"), work) == {"n": 1}
    assert run_hop(rt, SimpleNamespace(id="t2", retries=0), ("e", 1, "exec"), work) == {"n": 1}
    assert len(calls) == 1
    with session_scope(sqlite_url) as s:
        assert s.query(Event).filter_by(kind="side.effect").count() == 1


def test_run_hop_drops_a_duplicate_while_the_first_is_working(tmp_path, sqlite_url):
    rt = _rt(tmp_path, sqlite_url)
    with session_scope(sqlite_url) as s:
        ledger.claim(s, "e", 2, "generate", "first")
    with pytest.raises(Ignore):
        run_hop(rt, SimpleNamespace(id="second", retries=0), ("e", 2, "generate"), lambda _ctx: ({}, None))


def test_the_ledger_sets_no_delivery_limit_of_its_own(tmp_path, sqlite_url):
    """One count, one limit: `MegaFlowTask` counts deliveries and stops poison messages; the ledger counts nothing.

    (A second limit on the ledger's count tripped first and recorded a result the decision could not read.)
    """
    rt = _rt(tmp_path, sqlite_url)
    req = SimpleNamespace(id="t", retries=0)
    for _ in range(rt.settings.hop_max_deliveries + 2):
        with session_scope(sqlite_url) as s:
            ledger.claim(s, "p", 0, "exec", "t")
    result = run_hop(rt, req, ("p", 0, "exec"), lambda _ctx: ({"hop": "exec", "step": 0, "ran": True}, None))
    assert result["ran"]


def test_a_poisoned_hop_records_its_result_naming_the_hop(tmp_path, sqlite_url):
    from megaflow.app import make_app

    task = make_app(Settings(data_dir=tmp_path, database_url=sqlite_url)).tasks["megaflow.hop.exec"]
    task.push_request(id="t1")
    with session_scope(sqlite_url) as s:
        ledger.claim(s, "ep", 3, "exec", "t1")
    out = task._poisoned(6, 5, ("ep", 3), {})
    assert (out["hop"], out["step"], out["exit_status"], out["kind"]) == ("exec", 3, "poison", "infra")
    assert "exec hop" in out["error"]
    with session_scope(sqlite_url) as s:
        assert ledger.recorded(s, "ep", 3, "exec") == out
        assert s.query(Event).filter_by(kind="task.poison").count() == 1
    # A result recorded before (the worker died before its acknowledgement) wins over poison.
    with session_scope(sqlite_url) as s:
        ledger.record(s, "ep", 4, "exec", "t2", {"hop": "exec", "step": 4, "exit_code": 0})
    assert task._poisoned(6, 5, ("ep", 4), {})["exit_code"] == 0


def test_replayed_hop_with_inserts_does_not_collide(tmp_path, sqlite_url):
    """A redelivered decision whose rows exist replays instead of failing on a duplicate key."""
    from megaflow.db.models import Event as Ev

    rt = _rt(tmp_path, sqlite_url)

    def work(_ctx):
        def write(s):
            s.add(Ev(id=4242, kind="unique.row"))  # a second insert would violate the primary key
        return {"next": "x"}, write

    req = SimpleNamespace(id="t", retries=0)
    assert run_hop(rt, req, ("d", 0, "agent.start"), work, side_effects=False, precheck=False) == {"next": "x"}
    assert run_hop(rt, req, ("d", 0, "agent.start"), work, side_effects=False, precheck=False) == {"next": "x"}


def test_a_crashing_hop_is_recorded_as_an_infra_failure(tmp_path, sqlite_url):
    rt = _rt(tmp_path, sqlite_url)

    def work(_ctx):
        raise KeyError("backend bug")

    for side_effects in (True, False):
        key = ("c", int(side_effects), "generate")
        result = run_hop(rt, SimpleNamespace(id="t", retries=0), key, work, side_effects=side_effects)
        assert result["kind"] == "infra" and result["exit_status"] == "generate_crashed"
        assert "KeyError" in result["error"]
        with session_scope(sqlite_url) as s:
            assert ledger.recorded(s, *key) == result
