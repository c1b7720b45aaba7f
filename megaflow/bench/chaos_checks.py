"""What `megaflow bench chaos` reads from the database and the broker once a run is over.

Progress (to tell a stalled run from a slow one), messages still queued, chords that
never closed, dead letters (the bench's own malformed messages apart from the
platform's), and the sandboxes left after the workers' reaping and after a cleanup.
"""

from __future__ import annotations

import time

from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from megaflow.bench.chaos_watch import SandboxWatcher
from megaflow.client import Client
from megaflow.config import Settings
from megaflow.db import states
from megaflow.db.models import Episode, Hop, RolloutGroup, Run, SandboxRow


def status(client: Client, run_id: str) -> dict | None:
    try:
        return client.status(run_id)
    except DBAPIError:  # the database is restarting
        return None


def progress(client: Client, run_id: str):
    """Something that changes whenever the run moves: hops done or begun, and episodes by state."""
    try:
        with client.session() as s:
            hops = s.execute(select(func.count(), func.sum(Hop.attempts), func.max(Hop.finished_at))).one()
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
