"""What `megaflow bench chaos` reads from the database and the broker once a run is over.

Progress (to tell a stalled run from a slow one), messages still queued, lost episodes
and where they stopped, chords that never closed, dead letters (the bench's own
malformed messages apart from the platform's), the sandboxes left after the workers'
reaping and after a cleanup; and the private vhost and database a run uses.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from megaflow.bench.chaos_watch import SandboxWatcher
from megaflow.bench.faults import FaultLog, is_local
from megaflow.client import Client
from megaflow.config import Settings
from megaflow.db import states
from megaflow.db.models import Delivery, Episode, Event, Hop, RolloutGroup, Run, SandboxRow


def status(client: Client, run_id: str) -> dict | None:
    try:
        return client.status(run_id)
    except DBAPIError:  # the database is restarting
        return None


def progress(client: Client, run_id: str):
    """Something that changes whenever the run moves: hops done or begun (or begun again), and episodes by state."""
    try:
        with client.session() as s:
            # A hop begun again (a retry, a redelivery, a takeover) moves its started_at.
            hops = s.execute(select(func.count(), func.max(Hop.started_at), func.max(Hop.finished_at))).one()
            by_state = s.execute(select(Episode.state, func.count()).where(Episode.run_id == run_id)
                                 .group_by(Episode.state)).all()
        return tuple(hops), tuple(sorted(by_state))
    except DBAPIError:
        return None


def queued(broker_url: str, host: str) -> int:
    """Messages ready on the pools' queues (delay queues included, where we can see them)."""
    from kombu import Connection

    names = ["model", "agent", "env", f"env.{host}"]
    total = 0
    try:
        with Connection(broker_url, connect_timeout=5) as conn:
            for name in names:
                try:
                    total += conn.channel().queue_declare(name, passive=True).message_count
                except Exception:
                    continue
    except Exception:  # the broker is away: assume messages are waiting
        return 1
    return total


def settle_chords(client: Client, run_id: str, timeout_s: float = 90.0) -> None:
    """Once every episode ended, give the callbacks (retrying through a restart) time to run."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = status(client, run_id)
        if st is not None:
            if st["status"] == "finished" or any(s not in states.TERMINAL for s in st["by_state"]):
                return
            with client.session() as s:
                if not chords_unclosed(s, run_id):
                    return
        time.sleep(1.0)


def chords_unclosed(s, run_id: str) -> int:
    """Groups whose current members are all terminal but whose callback never ran; +1 for the run's own."""
    rows = s.execute(select(RolloutGroup.id, RolloutGroup.status, Episode.state).join(
        Episode, Episode.group_id == RolloutGroup.id).where(
        RolloutGroup.run_id == run_id, Episode.superseded_by.is_(None))).all()
    groups: dict[str, tuple[str, bool]] = {}
    for gid, gstatus, st in rows:
        _, all_ended = groups.get(gid, (gstatus, True))
        groups[gid] = (gstatus, all_ended and st in states.TERMINAL)
    unclosed = sum(1 for gstatus, ended in groups.values() if ended and gstatus != "finished")
    run_open = s.get(Run, run_id).status not in ("finished", "cancelled")
    every_group_closed = groups and all(g == "finished" for g, _ in groups.values())
    return unclosed + (1 if every_group_closed and run_open else 0)


def dead_letters(app, malformed: list, timeout_s: float = 60.0) -> dict:
    """Drain ``megaflow.dead`` (waiting a little for the bench's own malformed messages to arrive)."""
    ours = {m["headers"].get("id") for _, m in malformed if m["headers"].get("id")}
    deadline = time.monotonic() + timeout_s
    with app.connection_for_write() as conn:
        while conn.default_channel.queue_declare("megaflow.dead", passive=True)[1] < len(malformed):
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        platform, bench = [], 0
        ch = conn.default_channel
        while (msg := ch.basic_get("megaflow.dead", no_ack=True)) is not None:
            headers = msg.headers or {}
            if not headers.get("id") or headers.get("id") in ours:
                bench += 1
            else:
                death = (headers.get("x-death") or [{}])[0]
                platform.append(f"{headers.get('task', '?')} from {death.get('queue', '?')}")
    return {"dead_lettered": bench + len(platform), "malformed_messages_dead_lettered": bench,
            "dead_lettered_platform": len(platform), "dead_lettered_platform_tasks": platform[:10]}


def after_run(client: Client, settings: Settings, watcher: SandboxWatcher, run_id: str, wait_s: float) -> dict:
    """Sandboxes left once the live workers' reapers had up to `wait_s` (no cleanup of the bench's)."""
    t0 = time.monotonic()
    try:
        at_end = watcher.count()
    except Exception:  # the engine is busy
        at_end = None
    while time.monotonic() - t0 < wait_s:
        try:
            if watcher.count() == 0 and not live_rows(client):
                break
        except Exception:  # the engine or the database is busy: look again
            pass
        time.sleep(2.0)
    rows = live_rows(client)
    count, procs = watcher.count(), watcher.processes()
    return {"sandboxes_at_run_end": at_end, "leaked_after_run": max(count, rows) + procs,
            "leaked_after_run_sandboxes": count, "leaked_after_run_rows": rows, "leaked_after_run_processes": procs,
            "reap_wait_s": round(time.monotonic() - t0, 1)}


def live_rows(client: Client) -> int:
    with client.session() as s:
        return s.execute(select(func.count()).select_from(SandboxRow).where(SandboxRow.destroyed_at.is_(None))
                         ).scalar()


def cleanup(settings: Settings, client: Client, watcher: SandboxWatcher) -> dict:
    """`megaflow cleanup` (every host, no grace) after the workers stopped; what it removed and what is left."""
    from megaflow.reaper import reap

    report = reap(settings, all_hosts=True, grace_s=0)
    rows = live_rows(client)
    count, procs = watcher.count(), watcher.processes()
    return {"sandboxes_reaped_by_cleanup": len(report["destroyed"]), "cleanup_errors": report["errors"][:5],
            "leaked_after_cleanup": max(rows, count) + procs}


def lost_now(client: Client, run_id: str) -> dict:
    """Current episodes not terminal now, and what the ledger says of them."""
    with client.session() as s:
        eps = s.execute(select(Episode).where(Episode.run_id == run_id, Episode.superseded_by.is_(None),
                                              Episode.state.not_in(states.TERMINAL))).scalars().all()
        by_state: dict[str, int] = {}
        for ep in eps:
            by_state[ep.state] = by_state.get(ep.state, 0) + 1
        return {"episodes_lost": len(eps), "lost_by_state": by_state,
                "lost_episodes": [lost_detail(s, ep) for ep in eps[:10]]} if eps else {}


def last_exec_deliveries(s, episode_ids: list[str]) -> dict[str, tuple[int, int]]:
    """Per episode, the step of its last exec hop and how often that hop's message was delivered.

    Deliveries are the first one plus the redeliveries `megaflow.delivery` counted:
    the one delivery count (the ledger keeps none).
    """
    last = {eid: (step, task_id) for eid, step, task_id in s.execute(
        select(Hop.subject_id, Hop.step_index, Hop.task_id).where(
            Hop.hop == "exec", Hop.subject_id.in_(episode_ids)).order_by(Hop.step_index)).all()}
    redelivered = dict(s.execute(select(Delivery.task_id, func.sum(Delivery.count)).where(
        Delivery.task_name == "megaflow.hop.exec", Delivery.task_id.in_([t for _, t in last.values()]))
        .group_by(Delivery.task_id)).all())
    return {eid: (step, 1 + int(redelivered.get(task_id) or 0)) for eid, (step, task_id) in last.items()}


def lost_detail(s, ep) -> dict:
    """What the ledger says of an episode left unfinished: where it stopped, for the bug report."""
    hops = s.execute(select(Hop.step_index, Hop.hop, Hop.status).where(Hop.subject_id == ep.id)
                     .order_by(Hop.started_at)).all()
    events = s.execute(select(Event.kind).where(Event.subject_id == ep.id).order_by(Event.id)).scalars().all()
    return {"episode": ep.id, "state": ep.state, "wait_reason": ep.wait_reason, "n_steps": ep.n_steps,
            "sandbox": ep.sandbox_id, "created_at": str(ep.created_at), "started_at": str(ep.started_at),
            "hops": [f"{i}:{h}:{st}" for i, h, st in hops][-8:], "events": events[-8:]}


def private_vhost(broker: str, name: str, faults: FaultLog):
    ctl = shutil.which("rabbitmqctl")
    parts = urlsplit(broker)
    if ctl is None or not is_local(broker):
        faults.notes.append("no private vhost (rabbitmqctl not here): the bench shares the broker's vhost")
        return broker, None
    user = parts.username or "guest"
    subprocess.run([ctl, "add_vhost", name], check=True, capture_output=True)
    subprocess.run([ctl, "set_permissions", "-p", name, user, ".*", ".*", ".*"], check=True, capture_output=True)
    url = urlunsplit((parts.scheme, parts.netloc, "/" + name, "", ""))
    return url, lambda: subprocess.run([ctl, "delete_vhost", name], capture_output=True)


def private_database(admin_url: str, name: str):
    from sqlalchemy import create_engine, text

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"

    def drop() -> None:
        from megaflow.db.engine import dispose_all

        dispose_all()
        for _ in range(30):  # the server may still be coming back from its restart
            try:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                break
            except DBAPIError:
                time.sleep(1)
        admin.dispose()
    return url, drop
