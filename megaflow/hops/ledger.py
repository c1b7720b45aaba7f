"""The idempotency ledger: claim a hop before doing it, finish it with a compare-and-set.

Keys are ``(subject_id, step_index, hop)``. Outcomes of `claim`:

* ``NEW``  — nobody did this hop: do it (also when our own earlier delivery of
  the same task id died half-way, or Celery is retrying it);
* ``DONE`` — it is recorded: skip the work and re-send what was recorded;
* ``BUSY`` — another message (a duplicate lineage) holds it: drop this one. The
  holder is alive, or its unacked message will be redelivered by the broker.
  Except a row *orphaned* by host recovery (`orphan`: its holder was on an env
  host declared dead): the next claim takes it over (``NEW``, attempts counted on).

`finish` marks the row done only if it is still ``started`` by the same task; the hop's own
writes happen in the same transaction, so two deliveries racing through the
same hop commit exactly one result.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from megaflow.db.models import Hop, utcnow
from megaflow.db.sql import insert_ignore

NEW, DONE, BUSY = "new", "done", "busy"
#: The task id of a `started` row whose holder was lost with its host: anyone may take it over.
ORPHANED = "orphaned"


class ClaimLost(Exception):
    """The hop's `started` row is no longer its own (orphaned by recovery, then maybe taken over)."""


@dataclass(frozen=True)
class Claim:
    status: str
    result: dict | None = None
    attempts: int = 1


def claim(session: Session, subject: str, step: int, hop: str, task_id: str) -> Claim:
    row = {"subject_id": subject, "step_index": step, "hop": hop, "task_id": task_id,
           "status": "started", "attempts": 1, "started_at": utcnow()}
    if session.execute(insert_ignore(session.connection(), Hop.__table__, row)).rowcount == 1:
        return Claim(NEW)
    found = session.execute(
        select(Hop.status, Hop.task_id, Hop.result, Hop.attempts).where(
            Hop.subject_id == subject, Hop.step_index == step, Hop.hop == hop)
    ).one()
    if found.status == "done":
        return Claim(DONE, found.result, found.attempts)
    if found.task_id != task_id:
        if found.task_id == ORPHANED and session.execute(
                update(Hop).where(Hop.subject_id == subject, Hop.step_index == step, Hop.hop == hop,
                                  Hop.status == "started", Hop.task_id == ORPHANED)
                .values(task_id=task_id, attempts=found.attempts + 1, started_at=utcnow())).rowcount == 1:
            return Claim(NEW, None, found.attempts + 1)
        return Claim(BUSY, None, found.attempts)
    attempts = found.attempts + 1
    session.execute(
        update(Hop).where(Hop.subject_id == subject, Hop.step_index == step, Hop.hop == hop)
        .values(attempts=attempts, started_at=utcnow())
    )
    return Claim(NEW, None, attempts)


def finish(session: Session, subject: str, step: int, hop: str, result: dict, duration_s: float | None = None,
           task_id: str | None = None) -> bool:
    """Record the hop's result. False if another delivery recorded it first (roll back then).

    With `task_id`, only if the row is still that task's (not orphaned or taken over since).
    """
    stmt = (
        update(Hop)
        .where(Hop.subject_id == subject, Hop.step_index == step, Hop.hop == hop, Hop.status == "started")
        .values(status="done", result=result, finished_at=utcnow(), duration_s=duration_s)
    )
    if task_id is not None:
        stmt = stmt.where(Hop.task_id == task_id)
    return session.execute(stmt).rowcount == 1


def orphan(session: Session, subject: str, hops: tuple[str, ...]) -> int:
    """Release the `started` rows of `subject`'s `hops` from their (lost) holders; returns how many."""
    return session.execute(
        update(Hop).where(Hop.subject_id == subject, Hop.hop.in_(hops), Hop.status == "started")
        .values(task_id=ORPHANED)
    ).rowcount


def record(session: Session, subject: str, step: int, hop: str, task_id: str, result: dict | None,
           duration_s: float | None = None) -> bool:
    """Insert a finished hop. False if it was already recorded (roll back then).

    The result may be filled in later in the same transaction (`set_result`):
    other transactions only ever see the row with its result.
    """
    now = utcnow()
    row = {"subject_id": subject, "step_index": step, "hop": hop, "task_id": task_id, "status": "done",
           "attempts": 1, "result": result, "started_at": now, "finished_at": now, "duration_s": duration_s}
    return session.execute(insert_ignore(session.connection(), Hop.__table__, row)).rowcount == 1


def set_result(session: Session, subject: str, step: int, hop: str, result: dict,
               duration_s: float | None = None) -> None:
    """Fill in the result of a row `record` inserted in this same transaction."""
    session.execute(
        update(Hop).where(Hop.subject_id == subject, Hop.step_index == step, Hop.hop == hop)
        .values(result=result, duration_s=duration_s, finished_at=utcnow())
    )


def recorded(session: Session, subject: str, step: int, hop: str) -> dict | None:
    """The recorded result of a finished hop, or None."""
    return session.execute(
        select(Hop.result).where(Hop.subject_id == subject, Hop.step_index == step, Hop.hop == hop,
                                 Hop.status == "done")
    ).scalar()


def exists(session: Session, subject: str, step: int, hop: str) -> bool:
    return session.execute(
        select(Hop.status).where(Hop.subject_id == subject, Hop.step_index == step, Hop.hop == hop)
    ).first() is not None
