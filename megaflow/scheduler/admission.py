"""FIFO admission of episodes, event-driven.

An episode's first decision asks for room: a slot of the global semaphore, of a
live env host (placement), of its image and of its owner's quotas, all or none.
Without room it *waits*: its state becomes ``waiting`` and the Celery options of
its start message (task id, chord) are parked in its row; the message is acked
without counting as the chord member's end. An episode that ends gives its slots
back once its end has committed and admits the earliest waiters (by global
submission order, ``episodes.seq``) that now fit; their start messages are sent
again after the commit. A host joining admits too. Nothing polls.

Order: waiting for shared capacity is strict FIFO (a newcomer queues behind
earlier capacity waiters). Waiting on a quota or a full image does not hold up
episodes of other users or images.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.orm import Session

from megaflow.config import Settings
from megaflow.contract import HopResult
from megaflow.db import states
from megaflow.db.states import ExitStatus
from megaflow.db.models import Episode, utcnow
from megaflow.db.sql import Tracked, prepared
from megaflow.events import emit
from megaflow.model import policy as policies
from megaflow.scheduler import hosts, quotas, semaphores, staleness

log = logging.getLogger(__name__)

#: A reason starting with this blocks later episodes (strict FIFO on shared capacity).
CAPACITY = "capacity"
#: Waiters looked at per admission round.
ROUND = 16
#: The start message of an admitted episode says it follows its admission, not its submission.
ADMIT = HopResult(hop="admit").wire()


def claim_of(rt, ep) -> dict:
    """What admission needs to know of an episode (from the worker's warm caches)."""
    spec = rt.spec(ep.run_id)
    config = rt.sandbox_config(ep)
    limits = spec.limits
    hold_s = limits.episode_timeout_s + limits.eval_timeout_s + limits.provision_timeout_s + 600
    claim = {"user": spec.user, "project": spec.project, "run_id": ep.run_id,
             "image": config.image if config.type == "docker" else None, "hold_s": hold_s}
    rl = staleness.rl_claim(spec.rl)
    if rl is not None:
        claim["rl"] = rl
    return claim


def try_admit(s: Session, settings: Settings, episode_id: str, claim: dict) -> tuple[bool, str | None, str | None]:
    """Take every slot the episode needs.

    Returns:
        (True, host, None) when admitted (host None without placement), else
        (False, None, why it waits).
    """
    expires = utcnow() + dt.timedelta(seconds=claim["hold_s"])
    qs = quotas.quotas_of(s, claim["user"], claim["project"])
    keys = quotas.concurrency_keys(qs)
    if claim.get("image"):
        keys.append(semaphores.image_key(claim["image"]))
    host = None
    if settings.placement:
        choices, preferred = hosts.choices(hosts.live_hosts(s, settings.host_dead_after_s), claim.get("image"))
        taken, full = semaphores.acquire_least_used(s, keys, choices, episode_id, expires, preferred)
        if full is not None:
            return False, None, _reason(s, full)
        if taken is None:
            return False, None, f"{CAPACITY}: no live env host with a free slot"
        host = semaphores.host_of(taken)
    else:
        full = semaphores.acquire(s, keys, episode_id, expires)
        if full is not None:
            return False, None, _reason(s, full)
    spent = quotas.count_admission(s, qs)
    if spent is not None:
        semaphores.release_all(s, episode_id)
        return False, None, f"quota {spent.scope} {spent.name}: max_total {spent.max_total} reached"
    return True, host, None


def _reason(s: Session, key: str) -> str:
    used, limit = semaphores.usage(s, key).get(key, (0, None))
    if key == semaphores.GLOBAL:
        return f"{CAPACITY}: global limit {limit} reached"
    kind, _, name = key.partition(":")
    if kind == "quota":
        scope, _, who = name.partition(":")
        return f"quota {scope} {who}: max_concurrent {limit} reached"
    return f"{kind} {name}: limit {limit} reached"


def start(s: Session, settings: Settings, ep: Tracked, claim: dict, task: dict) -> tuple[bool, str | None]:
    """Admit an episode at its first decision, or park it. Returns (admitted, host).

    The caller records the admission (``admitted_at``) with the episode's next move.
    """
    rl = claim.get("rl")
    if rl is not None:
        # Its batch may start only once the trainer is within the run's staleness bound.
        rl.setdefault("need", staleness.needed_for(s, ep.run_id, ep.group_id, rl))
        policies.lock(s, rl["policy"], shared=True)  # a publication lands before this check or after the park
        if not staleness.admissible(policies.newest_version(s, rl["policy"]), rl["need"]):
            _park(s, ep, staleness.reason(rl["policy"], rl["need"]), claim, task)
            return False, None
    conn = s.connection()
    ahead = conn.execute(prepared(conn, "admission.ahead", _select_ahead), {"seq": ep.seq}).first()
    if ahead is not None:
        _park(s, ep, f"{CAPACITY}: behind earlier episodes", claim, task)
        return False, None
    ok, host, why = try_admit(s, settings, ep.id, claim)
    if not ok:
        _park(s, ep, why, claim, task)
        return False, None
    return True, host


def _select_ahead(conn):
    e = Episode.__table__.c
    return select(e.id).where(e.state == states.WAITING, e.seq < bindparam("seq", type_=e.seq.type),
                              e.wait_reason.startswith(CAPACITY)).limit(1)


def _park(s: Session, ep: Tracked, why: str, claim: dict, task: dict) -> None:
    if states.move(s, ep.id, states.WAITING, wait_reason=why, parked={"claim": claim, "task": task}):
        emit(s, "episode.waiting", ep.run_id, ep.id, {"reason": why})


def admit_waiting(s: Session, settings: Settings, rounds: int = 1) -> list[dict]:
    """Admit the earliest waiters that fit now. Returns their parked start messages to send."""
    admitted: list[dict] = []
    for _ in range(rounds):
        # Episodes held for a policy version are admitted by its publication (`admit_published`).
        rows = s.execute(select(Episode.id, Episode.run_id, Episode.parked, Episode.wait_reason)
                         .where(Episode.state == states.WAITING,
                                or_(Episode.wait_reason.is_(None), ~Episode.wait_reason.startswith(staleness.POLICY)))
                         .order_by(Episode.seq).limit(ROUND).with_for_update(skip_locked=True)).all()
        blocked = False
        for eid, run_id, parked, was in rows:
            ok, host, why = try_admit(s, settings, eid, parked["claim"])
            if not ok:
                if why != was:
                    s.execute(update(Episode).where(Episode.id == eid).values(wait_reason=why))
                if why.startswith(CAPACITY):
                    blocked = True
                    break
                continue
            if states.move(s, eid, states.PENDING, wait_reason=None, admitted_at=utcnow(), host=host):
                emit(s, "episode.admitted", run_id, eid, {"host": host})
                admitted.append({"episode_id": eid, "run_id": run_id, "task": parked["task"]})
        if blocked or len(rows) < ROUND:
            break
    return admitted


def admit_published(s: Session, settings: Settings, policy: str) -> list[dict]:
    """A version of `policy` was published: admit the episodes held for it that fit now.

    Those whose version has come but find no room wait on as capacity (or quota)
    waiters, in their FIFO place. Returns their parked start messages to send.
    """
    newest = policies.newest_version(s, policy)
    rows = s.execute(select(Episode.id, Episode.run_id, Episode.seq, Episode.parked).where(
        Episode.state == states.WAITING, Episode.wait_reason.startswith(f"{staleness.POLICY} {policy}:"))
        .order_by(Episode.seq).with_for_update(skip_locked=True)).all()
    admitted: list[dict] = []
    conn = s.connection()
    for eid, run_id, seq, parked in rows:
        claim = parked["claim"]
        if not staleness.admissible(newest, claim["rl"]["need"]):
            continue
        if conn.execute(prepared(conn, "admission.ahead", _select_ahead), {"seq": seq}).first() is not None:
            ok, host, why = False, None, f"{CAPACITY}: behind earlier episodes"
        else:
            ok, host, why = try_admit(s, settings, eid, claim)
        if not ok:
            s.execute(update(Episode).where(Episode.id == eid).values(wait_reason=why))
            continue
        if states.move(s, eid, states.PENDING, wait_reason=None, admitted_at=utcnow(), host=host):
            emit(s, "episode.admitted", run_id, eid, {"host": host, "policy_version": newest})
            admitted.append({"episode_id": eid, "run_id": run_id, "task": parked["task"]})
    return admitted


#: A replayed end re-sends the starts of episodes admitted this long after it ended.
REPLAY_WINDOW_S = 60.0


def on_end(s: Session, settings: Settings, episode_id: str, replay: bool = False) -> list[dict]:
    """An episode is done: give its slots back and admit who fits now.

    Args:
        replay: the ending decision is being replayed (its first delivery's worker
            died): the waiters that first delivery admitted may never have been sent
            — it commits the admission, then sends — so admitted episodes that have
            not started, from just after this end, are sent again. A start that was
            only queued, not lost, then arrives twice; its ledger drops the second.
    """
    resend = []
    if replay:
        ended = s.execute(select(Episode.finished_at).where(Episode.id == episode_id)).scalar()
        if ended is not None:
            resend = unsent(s, Episode.admitted_at >= ended,
                            Episode.admitted_at <= ended + dt.timedelta(seconds=REPLAY_WINDOW_S))
    semaphores.release_all(s, episode_id)
    return resend + admit_waiting(s, settings)


def after_end(rt, episode_id: str, replay: bool = False) -> list[dict]:
    """`on_end` once the episode's end has committed; returns the start messages to send.

    Not inside the deciding transaction: there it held the semaphore rows every
    admission needs until its commit. A worker lost between the two leaves the slots
    held by an ended episode (`repair` gives them back) and admitted episodes unsent
    (the replayed decision sends them, see `on_end`).
    """
    with rt.session() as s:
        return on_end(s, rt.settings, episode_id, replay)


def unsent(s: Session, *where) -> list[dict]:
    """Admitted episodes whose start message has not run (no ``agent.admit`` hop), as messages to send."""
    from megaflow.db.models import Hop

    rows = s.execute(select(Episode.id, Episode.run_id, Episode.parked).where(
        Episode.state == states.PENDING, Episode.parked.is_not(None), Episode.admitted_at.is_not(None), *where,
        ~select(Hop.subject_id).where(Hop.subject_id == Episode.id, Hop.step_index == 0,
                                      Hop.hop == "agent.admit").exists())).all()
    return [{"episode_id": eid, "run_id": run_id, "task": parked["task"]} for eid, run_id, parked in rows]


def unpark_cancelled(s: Session, run_id: str) -> list[dict]:
    """Cancel a run's waiting episodes; their start messages must still run to close the chords."""
    rows = s.execute(select(Episode.id, Episode.parked).where(
        Episode.run_id == run_id, Episode.state == states.WAITING).with_for_update(skip_locked=True)).all()
    out = []
    for eid, parked in rows:
        if states.move(s, eid, states.CANCELLED, exit_status=ExitStatus.CANCELLED, wait_reason=None):
            out.append({"episode_id": eid, "run_id": run_id, "task": parked["task"]})
    return out


def parking_of(request) -> dict:
    """The Celery options that make a re-sent start message the same chord member."""
    return {"id": request.id, **{k: getattr(request, k, None) for k in ("chord", "group", "group_index", "root_id")}}


def send(app, admitted: list[dict]) -> None:
    """Send the parked start messages of admitted (or cancelled) episodes."""
    for a in admitted:
        t = a["task"]
        # Flower shows this label as the task's arguments (the form of `megaflow.hops.routing.label`).
        sig = app.signature("megaflow.episode", args=(ADMIT, a["episode_id"]),
                            argsrepr=f"run={a.get('run_id') or '?'} episode={a['episode_id']} step=0 hop=admit")
        sig.freeze(t["id"])
        sig.set(chord=t["chord"], group_id=t["group"], group_index=t["group_index"], root_id=t["root_id"])
        sig.apply_async()


def repair(s: Session, settings: Settings, stale_s: float = 300.0) -> list[dict]:
    """Undo what a lost message left behind; run now and then by each env host.

    Not the admission mechanism (that is the events above) but its safety net:
    slots held past their lease or by episodes long ended (their last decision was
    lost) are given back, and admitted episodes whose start message never came
    (the admitting worker died between commit and send) are sent again.

    Returns:
        Start messages to send: those re-sent and those admitted into freed room.
    """
    from megaflow.db.models import SemaphoreHolder

    old = utcnow() - dt.timedelta(seconds=stale_s)
    lost = set(semaphores.expired_holders(s))
    lost |= set(s.execute(select(SemaphoreHolder.holder).join(Episode, Episode.id == SemaphoreHolder.holder)
                          .where(Episode.state.in_(states.TERMINAL), Episode.finished_at < old)).scalars())
    for holder in sorted(lost):
        semaphores.release_all(s, holder)
    resend = unsent(s, Episode.admitted_at < old)
    if lost or resend:
        log.warning("scheduler repair: %d lost slot holders released, %d admitted episodes re-sent",
                    len(lost), len(resend))
    return resend + admit_waiting(s, settings, rounds=4) + readmit_published(s, settings)


def readmit_published(s: Session, settings: Settings) -> list[dict]:
    """`admit_published` for every policy episodes wait for: the publisher may have died between
    recording its version and admitting what it unblocked (the repair sweep's part of it)."""
    names = {(parked or {}).get("claim", {}).get("rl", {}).get("policy") for (parked,) in s.execute(
        select(Episode.parked).where(Episode.state == states.WAITING,
                                     Episode.wait_reason.startswith(staleness.POLICY + " ")).limit(1000)).all()}
    return [a for name in sorted(n for n in names if n) for a in admit_published(s, settings, name)]
