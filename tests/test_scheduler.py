"""Semaphores, placement, quotas and FIFO admission on the state database (SQLite here;
the racing test and the pipeline tests use PostgreSQL)."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from megaflow import Client, RunSpec, Settings
from megaflow.db import states
from megaflow.db.engine import session_scope
from megaflow.db.models import Episode, Host, utcnow
from megaflow.scheduler import admission, hosts, quotas, semaphores


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def any_db(request):
    """The state database on both paths: Python statements (SQLite), server-side functions (PostgreSQL)."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    from megaflow.db.schema import upgrade

    url = request.getfixturevalue("pg_url")
    upgrade(url)
    return url


def test_semaphore_all_or_none_and_idempotent(any_db):
    with session_scope(any_db) as s:
        semaphores.set_limit(s, "host:a", 2)
        semaphores.set_limit(s, "image:x", 1)
        assert semaphores.acquire(s, ["host:a", "image:x"], "e1") is None
        assert semaphores.acquire(s, ["host:a", "image:x"], "e1") is None  # retried: no second slot
        assert semaphores.usage(s)["host:a"] == (1, 2)
        # image full: nothing of e2's is taken, host slot included
        assert semaphores.acquire(s, ["host:a", "image:x"], "e2") == "image:x"
        assert semaphores.usage(s)["host:a"] == (1, 2)
        assert semaphores.held(s, "e2") == []
        assert semaphores.release_all(s, "e1") == ["global", "host:a", "image:x"]
        assert semaphores.release_all(s, "e1") == []  # released twice: counted once
        assert semaphores.usage(s)["host:a"] == (0, 2) and semaphores.usage(s)["global"][0] == 0
        assert semaphores.acquire(s, ["host:a", "image:x"], "e2") is None
        # Some keys only (a slot moved to another host): the rest stays held.
        assert semaphores.acquire(s, ["host:b"], "e2") is None
        assert semaphores.release_all(s, "e2", only=["host:a"]) == ["host:a"]
        assert semaphores.held(s, "e2") == ["global", "host:b", "image:x"]
        assert semaphores.usage(s)["host:a"] == (0, 2) and semaphores.usage(s)["image:x"] == (1, 1)


def test_expired_holders_are_found(any_db):
    with session_scope(any_db) as s:
        semaphores.acquire(s, ["host:a"], "old", expires_at=utcnow() - dt.timedelta(seconds=1))
        semaphores.acquire(s, ["host:a"], "new", expires_at=utcnow() + dt.timedelta(hours=1))
        assert semaphores.expired_holders(s) == ["old"]


def test_placement_least_loaded_with_image_affinity_and_no_dead_hosts(any_db):
    with session_scope(any_db) as s:
        hosts.register(s, "a", 4, ["img:1"])
        hosts.register(s, "b", 4, [])
        hosts.register(s, "c", 4, ["img:1"])
        hosts.register(s, "dead", 100, ["img:1"])
        s.execute(Host.__table__.update().where(Host.name == "dead")
                  .values(heartbeat_at=utcnow() - dt.timedelta(minutes=5)))
        for i in range(3):
            assert semaphores.acquire(s, ["host:a"], f"a{i}") is None
        live = hosts.live_hosts(s, dead_after_s=30)
        assert sorted(h["name"] for h in live) == ["a", "b", "c"]
        assert hosts.dead_hosts(s, 30) == ["dead"]
        choices, preferred = hosts.choices(live, "img:1")
        assert sorted(choices) == ["host:a", "host:b", "host:c"] and sorted(preferred) == ["host:a", "host:c"]
        # holding the image beats load; among those, the less loaded first
        assert semaphores.acquire_least_used(s, [], choices, "e1", preferred=preferred) == ("host:c", None)
        assert semaphores.acquire_least_used(s, [], choices, "e1", preferred=preferred) == ("host:c", None)
        assert semaphores.usage(s, "host:c")["host:c"] == (1, 4), "a retried admission takes no second slot"
        assert semaphores.acquire_least_used(s, [], hosts.choices(live, None)[0], "e2") == ("host:b", None)
        assert semaphores.acquire(s, ["host:a"], "a3") is None  # a full
        for i in range(3):
            assert semaphores.acquire_least_used(s, [], choices, f"x{i}", preferred=preferred)[0] == "host:c"
        assert semaphores.acquire_least_used(s, [], choices, "x3", preferred=preferred) == ("host:b", None)
        semaphores.set_limit(s, "image:x", 0)
        assert semaphores.acquire_least_used(s, ["image:x"], choices, "x4") == (None, "image:x")
        assert semaphores.held(s, "x4") == []
        for i in range(2):  # b 4/4, c 4/4, a 4/4
            semaphores.acquire(s, ["host:b"], f"y{i}")
        assert semaphores.acquire_least_used(s, [], choices, "x5") == (None, None)


def test_admissions_at_once_spread_over_the_hosts(any_db):
    """Loads read by every admitter before any of them took a slot (as when they run at once):
    the slots still go to the least used host at the moment each is taken, not all to the first."""
    with session_scope(any_db) as s:
        for name in ("ns1", "ns2", "ns3"):
            hosts.register(s, name, 3)
        stale, _ = hosts.choices(hosts.live_hosts(s, 30), None)
        placed = [semaphores.acquire_least_used(s, [], stale, f"e{i}")[0] for i in range(6)]
        assert sorted(placed) == ["host:ns1", "host:ns1", "host:ns2", "host:ns2", "host:ns3", "host:ns3"]


@pytest.fixture
def three_runs(tmp_path, sqlite_url):
    """Three runs (users alice, alice, bob) of 3 episodes each, recorded, not published."""
    client = Client(Settings(data_dir=tmp_path, database_url=sqlite_url))
    spec = {"name": "s", "rollouts": 3, "model": {"type": "scripted", "replies": ["x"]}, "sandbox": {"type": "memory"},
            "tasks": [{"instance_id": "t", "instruction": "i", "check": "true"}]}
    runs = [client._record(RunSpec.parse({**spec, "user": u}))[0] for u in ("alice", "alice", "bob")]
    return client, runs


def _episodes(s, run_id):
    return s.execute(select(Episode).where(Episode.run_id == run_id).order_by(Episode.seq)).scalars().all()


def _claim(user: str) -> dict:
    return {"user": user, "project": "default", "image": None, "hold_s": 3600, "run_id": "r"}


def _start(s, settings, ep, user):
    return admission.start(s, settings, ep, _claim(user), {"id": ep.id, "chord": None, "group": None,
                                                           "group_index": None, "root_id": None})


def _one_running_two_waiting(s, settings, run_id):
    """One host with one slot: the run's first episode admitted, the other two parked behind it."""
    hosts.register(s, "h", 1)
    e1, e2, e3 = _episodes(s, run_id)
    assert _start(s, settings, e1, "alice")[0]
    assert not _start(s, settings, e2, "alice")[0]
    assert not _start(s, settings, e3, "alice")[0]
    return e1, e2, e3


def test_fifo_admission_across_runs(three_runs, sqlite_url):
    client, (r1, r2, r3) = three_runs
    settings = client.settings
    with session_scope(sqlite_url) as s:
        hosts.register(s, "h", 2)
        e1, e2 = _episodes(s, r1)[:2]
        late = _episodes(s, r2)[0]
        early = _episodes(s, r1)[2]
        assert _start(s, settings, e1, "alice") == (True, "h")
        assert _start(s, settings, e2, "alice") == (True, "h")
        # full: a later run's episode waits, with a reason
        assert _start(s, settings, late, "alice") == (False, None)
        s.refresh(late)
        assert late.state == states.WAITING and late.wait_reason.startswith("capacity")
        # an earlier-submitted episode that starts later still waits (no overtaking the head)...
        assert _start(s, settings, early, "alice") == (False, None)
        # ...and is admitted first when a slot frees: FIFO by submission order, not by arrival
        admitted = admission.on_end(s, settings, e1.id)
        assert [a["episode_id"] for a in admitted] == [early.id]
        assert admitted[0]["task"]["id"] == early.id
        s.refresh(early)
        assert early.state == states.PENDING and early.host == "h" and early.wait_reason is None
        assert [a["episode_id"] for a in admission.on_end(s, settings, e2.id)] == [late.id]


def test_quota_waits_visibly_and_does_not_block_others(three_runs, sqlite_url):
    client, (r1, r2, r3) = three_runs
    settings = client.settings
    with session_scope(sqlite_url) as s:
        hosts.register(s, "h", 10)
        quotas.set_quota(s, "user", "alice", max_concurrent=1, max_total=2)
        a1, a2, a3 = _episodes(s, r1)
        b1 = _episodes(s, r3)[0]
        assert _start(s, settings, a1, "alice")[0]
        assert not _start(s, settings, a2, "alice")[0]
        s.refresh(a2)
        assert a2.wait_reason == "quota user alice: max_concurrent 1 reached"
        assert _start(s, settings, b1, "bob")[0], "a quota waiter must not hold up other users"
        assert [a["episode_id"] for a in admission.on_end(s, settings, a1.id)] == [a2.id]
        assert not _start(s, settings, a3, "alice")[0]
        admission.on_end(s, settings, a2.id)
        s.refresh(a3)
        assert a3.state == states.WAITING and a3.wait_reason == "quota user alice: max_total 2 reached"
        row = [q for q in quotas.list_quotas(s) if q["name"] == "alice"][0]
        assert row["admitted_total"] == 2 and row["running"] == 0
        # raising the quota lets it in
        quotas.set_quota(s, "user", "alice", max_concurrent=1, max_total=3)
        assert [a["episode_id"] for a in admission.admit_waiting(s, settings)] == [a3.id]


def test_cancel_releases_waiting_episodes(three_runs, sqlite_url):
    client, (r1, r2, r3) = three_runs
    settings = client.settings
    with session_scope(sqlite_url) as s:
        e1, e2, e3 = _one_running_two_waiting(s, settings, r1)
        out = admission.unpark_cancelled(s, r1)
        assert sorted(o["episode_id"] for o in out) == sorted([e2.id, e3.id])
        for e in (e2, e3):
            s.refresh(e)
            assert e.state == states.CANCELLED


def test_no_live_host_means_waiting_for_capacity(three_runs, sqlite_url):
    client, (r1, _, _) = three_runs
    with session_scope(sqlite_url) as s:
        e1 = _episodes(s, r1)[0]
        assert _start(s, client.settings, e1, "alice") == (False, None)
        s.refresh(e1)
        assert e1.wait_reason == "capacity: no live env host with a free slot"
        hosts.register(s, "h", 1)
        assert [a["episode_id"] for a in admission.admit_waiting(s, client.settings)] == [e1.id]


def test_repair_frees_lost_slots_and_resends_unsent_admissions(three_runs, sqlite_url):
    client, (r1, _, _) = three_runs
    settings = client.settings
    with session_scope(sqlite_url) as s:
        hosts.register(s, "h", 1)
        e1, e2, e3 = _episodes(s, r1)
        assert _start(s, settings, e1, "alice")[0]
        assert not _start(s, settings, e2, "alice")[0]
        # e1 ended long ago but its last decision was lost: its slot is still held
        s.execute(Episode.__table__.update().where(Episode.id == e1.id).values(
            state=states.FAILED, finished_at=utcnow() - dt.timedelta(hours=1)))
        assert admission.repair(s, settings, stale_s=60) == [
            {"episode_id": e2.id, "run_id": e2.run_id, "task": {"id": e2.id, "chord": None, "group": None,
                                                                "group_index": None, "root_id": None}}]
        assert semaphores.held(s, e1.id) == []
        # e2 was admitted but its start message never went out (the admitter died)
        s.execute(Episode.__table__.update().where(Episode.id == e2.id).values(
            admitted_at=utcnow() - dt.timedelta(hours=1)))
        assert [a["episode_id"] for a in admission.repair(s, settings, stale_s=60)] == [e2.id]


def test_a_replayed_end_resends_the_starts_its_first_delivery_admitted(three_runs, sqlite_url):
    """The ending decision commits the admission, then sends: a worker killed between leaves an admitted
    episode with no start message. The decision's redelivery (a replay) sends it again, at once."""
    from megaflow.db.models import Hop

    client, (r1, _, _) = three_runs
    settings = client.settings
    with session_scope(sqlite_url) as s:
        e1, e2, e3 = _one_running_two_waiting(s, settings, r1)
        s.execute(Episode.__table__.update().where(Episode.id == e1.id).values(
            state=states.SUCCEEDED, finished_at=utcnow()))
        # First delivery: e2 admitted into e1's slot; the worker dies before sending it.
        assert [a["episode_id"] for a in admission.on_end(s, settings, e1.id)] == [e2.id]
        # A plain second end finds nothing new (e3 still has no room) and sends nothing.
        assert admission.on_end(s, settings, e1.id) == []
        # The replayed decision sends e2's start again.
        assert [a["episode_id"] for a in admission.on_end(s, settings, e1.id, replay=True)] == [e2.id]
        # Once e2's start has run, a replay leaves it alone.
        s.add(Hop(subject_id=e2.id, step_index=0, hop="agent.admit", task_id=e2.id, status="done", result={}))
        s.flush()
        assert admission.on_end(s, settings, e1.id, replay=True) == []
