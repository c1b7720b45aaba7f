"""Host recovery, piece by piece, on SQLite and the embedded broker (no services needed).

The whole story with real hosts (network namespaces, SIGKILL, SIGSTOP) is tests/test_multihost.py.
"""

from __future__ import annotations

import datetime as dt
import json
from types import SimpleNamespace

import pytest
from sqlalchemy import select, update

from megaflow import Client, RunSpec, Settings
from megaflow.db import states
from megaflow.db.engine import session_scope
from megaflow.db.models import Episode, Event, Hop, Host, SandboxRow, utcnow
from megaflow.db import ledger
from megaflow.hops.base import run_hop
from megaflow.hops.env_rebuild import Rehomed, fenced_episode, replay_plan
from megaflow.runtime import Runtime
from megaflow.scheduler import hosts, recovery, semaphores
from queues import topology


@pytest.fixture
def world(tmp_path, sqlite_url):
    """Hosts `dead` (silent for 5 min), `live` and `full`; episode e1 mid-run on `dead`, e2 ended there."""
    settings = Settings(data_dir=tmp_path, database_url=sqlite_url, host="live", host_dead_after_s=30)
    client = Client(settings)
    spec = {"name": "r", "rollouts": 2, "model": {"type": "scripted", "replies": ["x"]},
            "sandbox": {"type": "memory"}, "tasks": [{"instance_id": "t", "instruction": "i", "check": "true"}]}
    run_id, _ = client._record(RunSpec.parse(spec))
    with session_scope(sqlite_url) as s:
        for name, cap in (("dead", 2), ("live", 2), ("full", 1)):
            hosts.register(s, name, cap)
        s.execute(update(Host).where(Host.name == "dead").values(heartbeat_at=utcnow() - dt.timedelta(minutes=5)))
        assert semaphores.acquire(s, ["host:full"], "someone") is None
        e1, e2 = s.execute(select(Episode.id).where(Episode.run_id == run_id).order_by(Episode.seq)).scalars()
        assert semaphores.acquire(s, ["host:dead"], e1) is None
        s.execute(update(Episode).where(Episode.id == e1).values(state=states.RUNNING, host="dead", sandbox_id="sb1"))
        s.execute(update(Episode).where(Episode.id == e2).values(state=states.SUCCEEDED, host="dead",
                                                                   sandbox_id="sb2"))
        for sid, eid in (("sb1", e1), ("sb2", e2)):
            s.add(SandboxRow(id=sid, backend="memory", host="dead", run_id=run_id, episode_id=eid,
                             state="in_use" if eid == e1 else "destroyed",
                             lease_expires_at=utcnow() + dt.timedelta(hours=1)))
        s.add(SandboxRow(id="pooled", backend="memory", host="dead", state="idle",
                         lease_expires_at=utcnow() + dt.timedelta(hours=1)))
        for step in (0, 1):
            ledger.record(s, e1, step, "exec", f"t{step}", {"hop": "exec", "step": step})
        ledger.claim(s, e1, 2, "exec", "t-old")       # the dead worker was running this command
        ledger.record(s, e1, 2, "agent.exec", "x", {})  # decisions are not host-bound: left alone
    return SimpleNamespace(settings=settings, rt=Runtime(settings), run_id=run_id, e1=e1, e2=e2, url=sqlite_url)


def test_a_silent_host_is_declared_dead_once_and_never_by_itself(world):
    with session_scope(world.url) as s:
        s.execute(update(Host).where(Host.name == "live").values(heartbeat_at=utcnow() - dt.timedelta(minutes=5)))
    assert recovery.declare_dead(world.rt) == ["dead"]
    assert recovery.declare_dead(world.rt) == []
    with session_scope(world.url) as s:
        assert dict(s.execute(select(Host.name, Host.state)).all()) == {"dead": "dead", "live": "up", "full": "up"}
        assert [e.data["host"] for e in s.execute(select(Event).where(Event.kind == "host.dead")).scalars()] == ["dead"]
        assert s.get(SandboxRow, "pooled").state == "lost", "its idle pooled sandboxes are lost with it"
        # A heartbeat (the host was only frozen) brings it back as a live host.
        assert hosts.heartbeat(s, "dead")
        assert s.get(Host, "dead").state == "up"


def test_rehome_moves_slot_host_sandbox_and_orphans_the_running_hop(world):
    assert recovery.in_flight(world.rt, "dead") == [world.e1], "the ended, final episode stays"
    now = utcnow()
    assert recovery.rehome(world.rt, world.e1, "dead", now) == "live", "the full host is skipped"
    assert recovery.rehome(world.rt, world.e1, "dead", now) is None, "moved once"
    with session_scope(world.url) as s:
        ep = s.get(Episode, world.e1)
        assert (ep.host, ep.sandbox_id) == ("live", None)
        assert semaphores.held(s, world.e1) == ["global", "host:live"]
        usage = semaphores.usage(s, "host:")
        assert usage["host:dead"][0] == 0 and usage["host:live"][0] == 1
        row = s.get(SandboxRow, "sb1")
        assert row.state == "lost" and row.lease_expires_at.replace(tzinfo=dt.UTC) <= utcnow(), "reapable now"
        assert s.get(SandboxRow, "sb2").state == "destroyed"
        hops_ = {(h.step_index, h.hop): (h.status, h.task_id) for h in s.execute(
            select(Hop).where(Hop.subject_id == world.e1)).scalars()}
        assert hops_[(2, "exec")] == ("started", ledger.ORPHANED)
        assert hops_[(0, "exec")] == ("done", "t0") and hops_[(2, "agent.exec")][1] == "x"
        [ev] = s.execute(select(Event).where(Event.kind == "episode.rehomed")).scalars()
        assert (ev.subject_id, ev.data["from"], ev.data["to"], ev.data["hops_orphaned"]) == (world.e1, "dead",
                                                                                              "live", 1)
        # The moved message (a fresh task id) takes the orphaned claim over; the dead one's late finish fails.
        assert ledger.claim(s, world.e1, 2, "exec", "t-new").status == ledger.NEW
        assert not ledger.finish(s, world.e1, 2, "exec", {"late": 1}, task_id="t-old")
        assert ledger.claim(s, world.e1, 2, "exec", "t-third").status == ledger.BUSY
        assert ledger.finish(s, world.e1, 2, "exec", {"ok": 1}, task_id="t-new")
        assert [i for i, _, _ in replay_plan(s, world.e1)] == [], "steps have no actions in this fixture"


def test_without_room_an_episode_waits_on_its_dead_host(world):
    with session_scope(world.url) as s:
        assert semaphores.acquire(s, ["host:live"], "a") is None
        assert semaphores.acquire(s, ["host:live"], "b") is None
    assert recovery.rehome(world.rt, world.e1, "dead") is None
    with session_scope(world.url) as s:
        ep = s.get(Episode, world.e1)
        assert (ep.host, ep.sandbox_id) == ("dead", "sb1")
        assert semaphores.held(s, world.e1) == ["global", "host:dead"]
        assert s.get(Hop, (world.e1, 2, "exec")).task_id == "t-old"


def test_a_hop_runs_only_where_its_episode_lives(world):
    with session_scope(world.url) as s:
        assert fenced_episode(s, world.e1, "dead").id == world.e1
        with pytest.raises(Rehomed) as info:
            fenced_episode(s, world.e1, "live")
        assert info.value.host == "dead"
        s.execute(update(Episode).where(Episode.id == world.e2).values(host=None))
        assert fenced_episode(s, world.e2, "anyone").id == world.e2, "not placed yet: whoever provisions it"


def test_a_claim_orphaned_mid_work_records_nothing(world):
    """The host was declared dead while its command ran: the late result is refused (ClaimLost)."""
    def work(_ctx):
        with session_scope(world.url) as s:  # recovery happens while the command runs
            ledger.orphan(s, world.e1, recovery.ENV_HOPS)

        def write(s):
            s.add(Event(kind="late.write"))
        return {"hop": "exec", "step": 5}, write

    with pytest.raises(ledger.ClaimLost):
        run_hop(world.rt, SimpleNamespace(id="t5", retries=0), (world.e1, 5, "exec"), work)
    with session_scope(world.url) as s:
        assert s.get(Hop, (world.e1, 5, "exec")).status == "started"
        assert s.execute(select(Event).where(Event.kind == "late.write")).first() is None


def _queued(app, name: str) -> list:
    out = []
    with app.connection_for_read() as conn:
        q = topology.make_queue(name)(conn.default_channel)
        while (m := q.get(no_ack=True)) is not None:
            out.append((m.headers, json.loads(m.body)))
    return out


def test_messages_of_a_dead_host_move_to_their_episodes_new_host(world):
    from megaflow.app import make_app

    app = make_app(world.settings)
    dead_q = topology.env_host_queue("dead").name

    def send(*args):
        return app.signature("megaflow.hop.exec", args=args, queue=dead_q, exchange=topology.EXCHANGE.name,
                             routing_key=dead_q).apply_async().id

    moved_id = send(world.e1, 2)
    send("no-such-episode", 1)
    with session_scope(world.url) as s:  # no room anywhere for e1 yet: its message waits
        for h in ("a", "b"):
            assert semaphores.acquire(s, ["host:live"], h) is None
    assert recovery.move_messages(app, world.rt, "dead") == (0, 1, 1)
    with session_scope(world.url) as s:
        semaphores.release_all(s, "a")
    assert recovery.move_messages(app, world.rt, "dead") == (1, 0, 0)
    [(headers, body)] = _queued(app, "env.live")
    assert body[0] == [world.e1, 2] and headers["task"] == "megaflow.hop.exec"
    assert headers["id"] != moved_id, "a moved message gets a fresh task id"
    assert _queued(app, dead_q) == []
    with session_scope(world.url) as s:
        assert s.get(Episode, world.e1).host == "live"


def test_recover_does_it_all_in_one_round(world):
    from megaflow.app import make_app

    report = recovery.recover(make_app(world.settings), world.rt)
    assert report["dead"] == ["dead"] and report["rehomed"] == [(world.e1, "dead", "live")]
    assert recovery.recover(make_app(world.settings), world.rt)["rehomed"] == []


def test_a_rehomed_episode_s_next_command_rebuilds_its_sandbox_by_replay(world):
    """exec on the new host: a fresh sandbox, setup, the executed commands again in order, then its own."""
    from megaflow.app import make_app
    from megaflow.db.models import Step
    from megaflow.hops import env_hop

    with session_scope(world.url) as s:
        for i in range(3):
            s.add(Step(episode_id=world.e1, index=i, messages_in=[], action=f"echo {i} >> trace.txt",
                       exit_code=0 if i < 2 else None))
    assert recovery.rehome(world.rt, world.e1, "dead") == "live"
    app = make_app(world.settings)
    task = SimpleNamespace(app=app, request=SimpleNamespace(id="t-new", retries=0), name="megaflow.hop.exec")
    result = env_hop.exec_task(task, world.e1, 2)
    assert (result["exit_code"], result["host"]) == (0, "live")
    rt = app._megaflow_runtime
    with session_scope(world.url) as s:
        ep = s.get(Episode, world.e1)
        assert ep.sandbox_id and ep.sandbox_id != "sb1"
        [ev] = s.execute(select(Event).where(Event.kind == "episode.rebuilt")).scalars()
        assert (ev.data["replayed"], ev.data["host"], ev.data["exit_code_differs"]) == (2, "live", [])
        assert s.get(Hop, (world.e1, 2, "exec")).task_id not in ("t-old", ledger.ORPHANED), \
            "the orphaned claim was taken over"
        row = s.get(SandboxRow, ep.sandbox_id)
        assert (row.host, row.state) == ("live", "in_use")
    assert rt.open_sandbox(ep.sandbox_id, rt.spec(world.run_id).sandbox).read_file("trace.txt") == b"0\n1\n2\n"
