"""Recovery of env hosts that died: their episodes move to live hosts and go on.

A host is *dead* when its heartbeat is older than ``Settings.host_dead_after_s``
(its env worker was SIGKILLed, the machine is gone, or it is cut off). Every live
env worker runs `recover` every ``heartbeat_s`` (`RecoveryThread`), and
``megaflow cleanup`` runs it once. A round:

1. **Declare.** A compare-and-set ``hosts.state`` up|down → dead (only while the
   heartbeat is still stale): exactly one recoverer wins and emits ``host.dead``.
   A host never declares itself dead.
2. **Re-home**, one episode per transaction. Each episode of a dead host that is
   still in flight (not ended, or ended but not yet final: it still holds its
   ``host:<dead>`` slot) is locked (``SKIP LOCKED``: one being decided right now
   waits for the next round), gets a slot on a live host by placement, gives its
   ``host:<dead>`` slot back, and gets ``episodes.host`` = the new host and
   ``episodes.sandbox_id`` = NULL. Its sandbox rows on the dead host become
   ``lost`` with an expired lease: whoever reaps that host (its own worker if it
   comes back, or ``megaflow cleanup --all-hosts``) destroys them. Ledger rows of
   its env hops still ``started`` by the dead worker are *orphaned*
   (`ledger.orphan`): the next delivery of that hop takes them over instead of
   being dropped as a duplicate. Event ``episode.rehomed`` {from, to}. Without a
   free slot anywhere the episode stays put and the next round tries again.
3. **Move.** The messages waiting in ``env.<dead>`` are taken one by one
   (``basic_get``) and republished, body and headers unchanged but under a
   *fresh task id*, to ``env.<their episode's host>`` with publisher confirms;
   only then is the original acknowledged. A crash in between leaves the
   original in the dead queue and maybe a copy on the live host: the ledger
   tells them apart by task id, so at most one runs.

On the new host, the first host-bound hop finds no sandbox (``sandbox_id`` NULL)
and rebuilds it: provision + setup, then the episode's already executed commands
replayed in order (`megaflow.hops.env_rebuild`).

Why "run twice" cannot happen when the dead host is not dead (frozen, cut off)
and still holds unacknowledged hops: a host-bound hop runs only where its
episode lives (checked in its claim's transaction, which locks the episode row
against re-homing), and records only if its ledger row is still its own (the
finish is a compare-and-set on the task id; re-homing orphans the row). A hop
that loses either race forwards itself to its episode's host under a fresh task
id and is dropped; its command, if it ran, ran in a sandbox nobody uses again.
Clocks of env hosts must agree to well under ``host_dead_after_s`` (NTP).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import uuid

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from megaflow.db import states
from megaflow.db.models import Episode, Host, SandboxRow, SemaphoreHolder, utcnow
from megaflow.events import emit
from megaflow.db import ledger
from megaflow.scheduler import hosts, semaphores
from queues import topology

log = logging.getLogger(__name__)

#: Ledger hop names of the env hops: their `started` rows are orphaned on re-homing.
ENV_HOPS = ("provision", "exec", "evaluate", "release")
#: Sandbox row states that belong to an episode still using the sandbox.
HELD = ("creating", "in_use", "releasing")
DEAD = "dead"


def recover(app, rt=None, now: dt.datetime | None = None) -> dict:
    """One recovery round (see the module docstring).

    Args:
        app: The Celery app (its broker connection moves the dead hosts' messages).
        rt: The worker's runtime; default: the app's (`get_runtime`).
        now: The recoverer's clock (tests).

    Returns:
        ``{"dead": hosts declared dead now, "rehomed": [(episode, from, to)], "moved": n,
        "kept": messages left in a dead queue (no room yet), "dropped": dead-lettered}``.
    """
    from megaflow.runtime import get_runtime

    rt = rt or get_runtime(app)
    report = {"dead": [], "rehomed": [], "moved": 0, "kept": 0, "dropped": 0}
    report["dead"] = declare_dead(rt, now)
    with rt.session() as s:
        dead = list(s.execute(select(Host.name).where(Host.state == DEAD, Host.name != rt.settings.host))
                    .scalars())
    for host in dead:
        for eid in in_flight(rt, host):
            to = rehome(rt, eid, host, now)
            if to is not None:
                report["rehomed"].append((eid, host, to))
        moved, kept, dropped = move_messages(app, rt, host, now)
        report["moved"] += moved
        report["kept"] += kept
        report["dropped"] += dropped
    if report["dead"] or report["rehomed"] or report["moved"]:
        log.warning("recovery: hosts declared dead %s; %d episodes re-homed; %d messages moved (%d kept)",
                    report["dead"], len(report["rehomed"]), report["moved"], report["kept"])
    return report


def declare_dead(rt, now: dt.datetime | None = None) -> list[str]:
    """Mark silent hosts dead (compare-and-set); returns the ones this call marked."""
    settings = rt.settings
    now = now or utcnow()
    since = now - dt.timedelta(seconds=settings.host_dead_after_s)
    marked = []
    with rt.session() as s:
        silent = s.execute(select(Host.name, Host.heartbeat_at).where(
            Host.state.in_(("up", "down")), Host.heartbeat_at < since, Host.name != settings.host)).all()
        for name, beat in silent:
            if s.execute(update(Host).where(Host.name == name, Host.state.in_(("up", "down")),
                                            Host.heartbeat_at < since).values(state=DEAD)).rowcount != 1:
                continue
            # Its idle pooled sandboxes go with it (in-use ones go with their episodes).
            s.execute(update(SandboxRow).where(SandboxRow.host == name, SandboxRow.state == "idle",
                                               SandboxRow.destroyed_at.is_(None))
                      .values(state="lost", lease_expires_at=now))
            emit(s, "host.dead", data={"host": name, "last_heartbeat": str(beat), "by": settings.host})
            marked.append(name)
    for name in marked:
        log.warning("env host %s missed its heartbeat for %.0fs: declared dead", name, settings.host_dead_after_s)
    return marked


def in_flight(rt, host: str) -> list[str]:
    """Episodes of `host` whose chain is not over: not ended, or ended but still holding the host's slot."""
    with rt.session() as s:
        holders = select(SemaphoreHolder.holder).where(SemaphoreHolder.key == semaphores.host_key(host))
        return list(s.execute(select(Episode.id).where(
            Episode.host == host, or_(Episode.state.not_in(states.TERMINAL), Episode.id.in_(holders)))
            .order_by(Episode.seq)).scalars())


def rehome(rt, episode_id: str, dead: str, now: dt.datetime | None = None) -> str | None:
    """Move one episode off a dead host, in one transaction. Returns its new host, or None (not now)."""
    from megaflow.scheduler.admission import claim_of

    now = now or utcnow()
    rt.warm(episode_id)  # SQLite: spec, task cached before the write transaction (one writer)
    with rt.session() as s:
        ep = s.execute(select(Episode).where(Episode.id == episode_id, Episode.host == dead)
                       .with_for_update(skip_locked=True)).scalar()
        if ep is None:  # moved by another recoverer, or being decided right now: next round
            return None
        live = [h for h in hosts.live_hosts(s, rt.settings.host_dead_after_s, now) if h["name"] != dead]
        old_key = semaphores.host_key(dead)
        # Not under the semaphores' lock: on PostgreSQL each change is its own transaction
        # (holding it here would deadlock with them). If the episode's end gives its slots
        # back meanwhile, a slot taken on the new host is one the repair sweep gives back.
        holder = s.execute(select(SemaphoreHolder).where(SemaphoreHolder.key == old_key,
                                                         SemaphoreHolder.holder == episode_id)).scalar()
        if holder is not None:
            to = _move_slot(s, episode_id, old_key, *hosts.choices(live, claim_of(rt, ep).get("image")),
                            holder.expires_at)
        else:  # ended and final already, or placement off: no slot to move
            live.sort(key=lambda h: (h["used"] / max(1, h["capacity"]), h["name"]))
            to = live[0]["name"] if live else None
        if to is None:
            s.rollback()
            log.info("episode %s of dead host %s waits for a free slot on a live host", episode_id, dead)
            return None
        s.execute(update(Episode).where(Episode.id == episode_id).values(host=to, sandbox_id=None))
        lost = s.execute(update(SandboxRow).where(
            SandboxRow.episode_id == episode_id, SandboxRow.host == dead, SandboxRow.state.in_(HELD),
            SandboxRow.destroyed_at.is_(None)).values(state="lost", lease_expires_at=now)).rowcount
        orphaned = ledger.orphan(s, episode_id, ENV_HOPS)
        emit(s, "episode.rehomed", ep.run_id, episode_id,
             {"from": dead, "to": to, "state": ep.state, "sandbox": ep.sandbox_id, "sandboxes_lost": lost,
              "hops_orphaned": orphaned})
    log.warning("episode %s re-homed from dead host %s to %s", episode_id, dead, to)
    return to


def _move_slot(s: Session, holder: str, old_key: str, choices: list[str], preferred: list[str],
               expires_at: dt.datetime | None) -> str | None:
    """Take a slot on the least used live host with room and give `old_key`'s back; the host, or None."""
    taken, _ = semaphores.acquire_least_used(s, [], choices, holder, expires_at, preferred)
    if taken is None:
        return None
    semaphores.release_all(s, holder, only=[old_key])
    return semaphores.host_of(taken)


def episode_of(message) -> str | None:
    """The episode id a hop message carries (its first argument)."""
    try:
        body = json.loads(message.body) if isinstance(message.body, (bytes, str)) else message.body
        args = body[0] if isinstance(body, list) else body.get("args", [])
        return args[0] if args and isinstance(args[0], str) else None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


def move_messages(app, rt, dead: str, now: dt.datetime | None = None) -> tuple[int, int, int]:
    """Move the messages waiting in ``env.<dead>`` to their episodes' hosts. Returns (moved, kept, dropped)."""
    from kombu import Producer

    queue = topology.env_host_queue(dead)
    moved = kept = dropped = 0
    with app.pool.acquire(block=True) as conn:  # the app's publishing connections (publisher confirms)
        channel = conn.channel()
        try:
            try:
                _, waiting, _ = channel.queue_declare(queue.name, passive=True)
            except conn.channel_errors:  # no such queue: nothing was ever sent there
                return 0, 0, 0
            if not waiting:
                return 0, 0, 0
            bound = queue(channel)
            producer = Producer(channel, exchange=topology.EXCHANGE)
            held = []
            for _ in range(waiting):  # a bounded pass: kept messages go back at the end
                message = bound.get(no_ack=False, accept=["json"])
                if message is None:
                    break
                eid = episode_of(message)
                to = _host_of(rt, eid) if eid else None
                if to == dead:
                    to = rehome(rt, eid, dead, now)  # e.g. an ended episode that still had a hop to run
                if eid is None or to is False:
                    log.error("message %s in %s names no known episode: dead-lettered",
                              message.headers.get("id"), queue.name)
                    message.reject(requeue=False)
                    dropped += 1
                    continue
                if to is None:
                    held.append(message)
                    continue
                _republish(producer, message, to)
                message.ack()
                moved += 1
            for message in held:
                message.requeue()
            kept = len(held)
        finally:
            try:
                channel.close()
            except (OSError, *conn.channel_errors, *conn.connection_errors):
                log.debug("closing the recovery channel failed (closed already)", exc_info=True)
    return moved, kept, dropped


def _host_of(rt, episode_id: str):
    with rt.session() as s:
        row = s.execute(select(Episode.host).where(Episode.id == episode_id)).first()
    return False if row is None else row[0]


def _republish(producer, message, host: str) -> None:
    """The same message to ``env.<host>``, under a fresh task id (confirmed by the broker before we return)."""
    target = topology.env_host_queue(host)
    headers = dict(message.headers or {})
    headers.pop("x-death", None)
    task_id = str(uuid.uuid4())
    headers["id"] = task_id
    props = message.properties or {}
    producer.publish(message.body, routing_key=target.name, exchange=topology.EXCHANGE, declare=[target],
                     headers=headers, content_type=message.content_type,
                     content_encoding=message.content_encoding, delivery_mode=2, correlation_id=task_id,
                     reply_to=props.get("reply_to"), priority=props.get("priority"), retry=True)


class RecoveryThread(threading.Thread):
    """Runs `recover` every `interval_s` in an env worker. A daemon thread."""

    def __init__(self, app, rt, interval_s: float):
        super().__init__(name="megaflow-recovery", daemon=True)
        self.app, self.rt, self.interval_s = app, rt, interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                recover(self.app, self.rt)
            except Exception:  # a failed round (database or broker down) must not end the timer
                log.warning("recovery round failed; next in %.1fs", self.interval_s, exc_info=True)

    def stop(self) -> None:
        self._stop_event.set()
