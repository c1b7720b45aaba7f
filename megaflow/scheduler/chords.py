"""Chords that should have closed and did not: found, flagged, closed.

A run closes through its chords: every episode returns to its group's chord,
whose body (``group.done``) returns to the run's, whose body (``run.done``) ends
the run. A member lost on the way (its final message dead-lettered, a join that
failed after every retry, a body never sent) would leave the run ``running``
forever with nothing in flight. `unclosed_runs` finds such runs: not ended, every
current episode terminal, the last of them ended more than `stale_s` ago — time
enough for its release hop and final decision, which take seconds. ``megaflow
status`` flags them (`chord_unclosed`), and the scheduler's repair sweep (each env
host, once a minute) closes them (`close_unclosed`): it does what the missing
bodies would have done, in one transaction per run, and records it in the hops
ledger under the bodies' own keys, so a body that arrives late replays the record.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from megaflow.db import states
from megaflow.db.models import Episode, RolloutGroup, Run, utcnow
from megaflow.events import emit
from megaflow.db import ledger
from megaflow.scheduler.closing import close_group, close_run

log = logging.getLogger(__name__)

#: How long after its last episode ended a run's chord counts as jammed.
STALE_S = 180.0
#: Run states that are over: their chords closed.
ENDED_RUNS = ("finished", "cancelled")


def unclosed_runs(s: Session, stale_s: float = STALE_S, run_id: str | None = None,
                  now: dt.datetime | None = None) -> list[dict]:
    """Runs whose episodes have all ended but whose chord has not closed.

    Args:
        s: A session on the state database.
        stale_s: Seconds since the run's last episode ended before it counts.
        run_id: Look at this run only.
        now: The clock (tests).

    Returns:
        ``[{"run_id", "generation", "episodes", "last_ended", "groups": [open group ids]}]``.
    """
    cutoff = (now or utcnow()) - dt.timedelta(seconds=stale_s)
    ended = func.sum(case((Episode.state.in_(states.TERMINAL), 1), else_=0))
    stmt = (select(Run.id, Run.generation, func.count(Episode.id), func.max(Episode.finished_at))
            .join(Episode, Episode.run_id == Run.id)
            .where(Run.status.not_in(ENDED_RUNS), Episode.superseded_by.is_(None))
            .group_by(Run.id, Run.generation)
            .having(ended == func.count(Episode.id)).having(func.max(Episode.finished_at) < cutoff))
    if run_id is not None:
        stmt = stmt.where(Run.id == run_id)
    out = []
    for rid, generation, n, last in s.execute(stmt).all():
        groups = list(s.execute(select(RolloutGroup.id).where(
            RolloutGroup.run_id == rid, RolloutGroup.status != "finished").order_by(RolloutGroup.id)).scalars())
        out.append({"run_id": rid, "generation": generation, "episodes": n, "last_ended": last, "groups": groups})
    return out


def chord_unclosed(s: Session, run_id: str, stale_s: float = STALE_S) -> bool:
    """True when every episode of the run has ended, long enough ago, but its chord has not closed.

    The flag ``megaflow status`` shows; the repair sweep closes such a run.
    """
    return bool(unclosed_runs(s, stale_s, run_id=run_id))


def close_unclosed(session_factory, stale_s: float = STALE_S, now: dt.datetime | None = None) -> list[str]:
    """Close every jammed run (see the module docstring); returns the runs closed.

    Args:
        session_factory: Makes a session that commits on exit (``Runtime.session``).
        stale_s: As `unclosed_runs`.
        now: The clock (tests).
    """
    with session_factory() as s:
        jammed = unclosed_runs(s, stale_s, now=now)
    closed = []
    for found in jammed:
        try:
            if _close(session_factory, found):
                closed.append(found["run_id"])
        except Exception:  # noqa: BLE001 - one run's trouble must not stop the others' repair
            log.warning("could not close the chord of run %s", found["run_id"], exc_info=True)
    return closed


def _close(session_factory, found: dict) -> bool:
    """Do what ``group.done`` and ``run.done`` would have, in one transaction, ledgered under their keys."""
    run_id, generation = found["run_id"], found["generation"]
    with session_factory() as s:
        # One repairer per run (another env host may sweep at the same moment).
        locked = s.execute(select(Run.status).where(Run.id == run_id, Run.generation == generation)
                           .with_for_update(skip_locked=True)).scalar()
        if locked is None or locked in ENDED_RUNS:
            return False
        # A body that arrives meanwhile records under the same key: whichever commits
        # second finds the row (its insert does nothing) and rolls back whole.
        for gid in found["groups"]:
            if ledger.recorded(s, gid, generation, "group.done") is None and not ledger.record(
                    s, gid, generation, "group.done", "repair", close_group(s, gid, generation)):
                s.rollback()
                return False
        if ledger.recorded(s, run_id, generation, "run.done") is not None:
            return False  # recorded but not ended: cannot happen (one transaction); leave it be
        summary = close_run(s, run_id, generation)
        if not ledger.record(s, run_id, generation, "run.done", "repair", summary):
            s.rollback()
            return False
        emit(s, "chord.repaired", run_id, run_id, {"generation": generation, "groups": found["groups"],
                                                    "last_ended": str(found["last_ended"])})
    log.warning("run %s: every episode ended by %s but its chord never closed; closed it (%d groups)",
                run_id, found["last_ended"], len(found["groups"]))
    return True
