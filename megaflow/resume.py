"""``megaflow resume RUN``: carry on with a run after a full stop.

When every worker died (and the queues were perhaps purged), a run's unfinished
episodes have no message left to move them, and its chords never close. Resume
re-runs, **as new attempts**, every current episode that is not done:

* unfinished ones (``pending``, ``waiting``, ``provisioning``, ``running``,
  ``evaluating``) are first ended ``infra_failed`` (exit status ``interrupted``);
* ``infra_failed`` ones (a sandbox or the model failed, a worker died mid-command)
  are never counted as done, so they are re-run too;
* ``succeeded`` and ``failed`` (the agent's own result) and ``cancelled`` are kept.

A new attempt is a new episode row (``attempt`` + 1, ``retry_of`` the old one) in
the same group and sample slot; the old row keeps its steps, hops and events and
points at its successor (``superseded_by``), so history is never rewritten.
Statistics, results and exports read only current rows. Why new rows rather than
continuing in place: an interrupted episode's sandbox may be gone or half-changed,
and its ledger already holds the hops it did — a fresh attempt is the only state
that is certainly clean, and it keeps the old trajectory for inspection.

The run's ``generation`` goes up by one and a new chord is sent over the groups
that need it (new attempts, or statistics never written); the run and group
callbacks of older generations, should their messages still be around, do
nothing. Resume is safe while workers run: an old lineage of a superseded episode
ends at its next decision and releases its sandbox.
"""

from __future__ import annotations

import logging
import time

from celery import chord
from sqlalchemy import func, select, update

from megaflow.db import states
from megaflow.db.states import ExitStatus
from megaflow.db.models import Episode, RolloutGroup, Run, new_id
from megaflow.events import emit

log = logging.getLogger(__name__)

#: States of a current episode that resume re-runs.
RERUN = frozenset({states.PENDING, states.PROVISIONING, states.RUNNING, states.EVALUATING, states.INFRA_FAILED,
                   getattr(states, "WAITING", "waiting")})


class ResumeError(ValueError):
    """The run cannot be resumed (cancelled, or unknown)."""


def plan(s, run_id: str) -> dict:
    """What resume would do, without doing it: counts by current state, and the episodes to re-run."""
    rows = s.execute(select(Episode.id, Episode.state).where(
        Episode.run_id == run_id, Episode.superseded_by.is_(None))).all()
    by_state: dict[str, int] = {}
    for _, st in rows:
        by_state[st] = by_state.get(st, 0) + 1
    return {"by_state": by_state, "rerun": [eid for eid, st in rows if st in RERUN]}


def resume(client, run_id: str) -> dict:
    """Re-run a run's unfinished and infra-failed episodes as new attempts, and close its chords.

    Returns:
        ``{"run_id", "generation", "rerun", "interrupted", "infra_failed", "groups"}``.

    Raises:
        LookupError: no such run.
        ResumeError: the run was cancelled.
    """
    admitted: list[dict] = []
    with client.session() as s:
        run = s.execute(select(Run).where(Run.id == run_id).with_for_update()).scalar_one_or_none()
        if run is None:
            raise LookupError(f"no run {run_id}")
        if run.cancel_requested:
            raise ResumeError(f"run {run_id} was cancelled; submit it again instead")
        generation = run.generation + 1
        old = s.execute(select(Episode).where(
            Episode.run_id == run_id, Episode.superseded_by.is_(None), Episode.state.in_(RERUN))
            .order_by(Episode.seq)).scalars().all()
        seq = max(int(s.execute(select(func.max(Episode.seq))).scalar() or 0) + 1, time.time_ns() // 1000)
        interrupted = infra_failed = 0
        fresh = []
        for ep in old:
            if ep.state == states.INFRA_FAILED:
                infra_failed += 1
            else:
                interrupted += 1
                error = f"interrupted; re-run as a new attempt by resume (generation {generation})"
                if states.move(s, ep.id, states.INFRA_FAILED, exit_status=ExitStatus.INTERRUPTED, error=error):
                    # As every other ending: followers and exports count endings by this event.
                    emit(s, "episode.ended", run_id, ep.id,
                         {"state": states.INFRA_FAILED, "exit_status": ExitStatus.INTERRUPTED, "error": error})
                admitted += _release_admission(s, client.settings, ep.id)
            new = Episode(id=new_id(), seq=seq, run_id=run_id, group_id=ep.group_id,
                          task_instance_id=ep.task_instance_id, sample_index=ep.sample_index,
                          attempt=ep.attempt + 1, retry_of=ep.id)
            seq += 1
            fresh.append((ep.id, new))
        s.add_all([new for _, new in fresh])
        s.flush()
        for old_id, new in fresh:
            s.execute(update(Episode).where(Episode.id == old_id).values(superseded_by=new.id))
        groups = sorted({new.group_id for _, new in fresh} | set(s.execute(select(RolloutGroup.id).where(
            RolloutGroup.run_id == run_id, RolloutGroup.status != "finished")).scalars()))
        s.execute(update(Run).where(Run.id == run_id).values(
            generation=generation, status="running", finished_at=None))
        report = {"run_id": run_id, "generation": generation, "rerun": len(fresh), "interrupted": interrupted,
                  "infra_failed": infra_failed, "groups": len(groups)}
        emit(s, "run.resumed", run_id, run_id, report)
    if admitted:
        from megaflow.scheduler import admission

        admission.send(client.app, admitted)
    _publish(client.app, run_id, generation, groups)
    log.info("resumed run %s (generation %d): %d episodes re-run in %d groups", run_id, generation, len(fresh),
             len(groups))
    return report


def _release_admission(s, settings, episode_id: str) -> list[dict]:
    """Give back the scheduler slots an interrupted episode held; returns waiters admitted into them."""
    try:
        from megaflow.scheduler import admission
    except ImportError:  # a build without the scheduler
        return []
    return admission.on_end(s, settings, episode_id)


def _publish(app, run_id: str, generation: int, groups: list[str]) -> None:
    body = app.signature("megaflow.run.done", args=(run_id, generation))
    if not groups:
        body.apply_async(args=([],))
        return
    header = [app.signature("megaflow.group.start", args=(g, generation)) for g in groups]
    chord(header, body).apply_async()
