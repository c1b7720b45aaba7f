"""The idempotency ledger: claim a hop before doing it, finish it with a compare-and-set.

Keys are ``(subject_id, step_index, hop)``. Outcomes of `claim`:

* ``NEW``  — nobody did this hop: do it (also when our own earlier delivery of
  the same task id died half-way, or Celery is retrying it);
* ``DONE`` — it is recorded: skip the work and re-send what was recorded;
* ``BUSY`` — another message (a duplicate lineage) holds it: drop this one. The
  holder is alive, or its unacked message will be redelivered by the broker.
  Except a row *orphaned* by host recovery (`orphan`: its holder was on an env
  host declared dead): the next claim takes it over (``NEW``).

The ledger counts nothing: deliveries of a message are counted once, in
``deliveries`` (`megaflow.delivery`), which stops poison messages.

`finish` marks the row done only if it is still ``started`` by the same task; the hop's own
writes happen in the same transaction, so two deliveries racing through the
same hop commit exactly one result.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from megaflow.db.models import Hop, utcnow
from megaflow.db.sql import dialect_insert, prepared

NEW, DONE, BUSY = "new", "done", "busy"
#: The task id of a `started` row whose holder was lost with its host: anyone may take it over.
ORPHANED = "orphaned"


class ClaimLost(Exception):
    """The hop's `started` row is no longer its own (orphaned by recovery, then maybe taken over)."""


@dataclass(frozen=True)
class Claim:
    status: str
    result: dict | None = None


# Every hop runs these statements, so they are built once (`prepared`) and run on
# the session's connection: no ORM statement processing, no autoflush.
_H = Hop.__table__


def _by_key(stmt):
    return stmt.where(_H.c.subject_id == bindparam("k_subject"), _H.c.step_index == bindparam("k_step"),
                      _H.c.hop == bindparam("k_hop"))


def _key(subject: str, step: int, hop: str) -> dict:
    return {"k_subject": subject, "k_step": step, "k_hop": hop}


def _set(**cols):
    """SET clauses: a fixed value, or (None) a bind parameter named ``v_<column>``."""
    return {c: bindparam(f"v_{c}", type_=_H.c[c].type) if v is None else v for c, v in cols.items()}


_BUILD = {
    "insert": lambda conn: dialect_insert(conn, _H).on_conflict_do_nothing(),
    "find": lambda conn: _by_key(select(_H.c.status, _H.c.task_id, _H.c.result)),
    "take_orphan": lambda conn: _by_key(update(_H)).where(_H.c.status == "started", _H.c.task_id == ORPHANED)
    .values(_set(task_id=None, started_at=None)),
    "retry": lambda conn: _by_key(update(_H)).values(_set(started_at=None)),
    "finish": lambda conn: _by_key(update(_H)).where(_H.c.status == "started")
    .values(_set(status="done", result=None, finished_at=None, duration_s=None, queued_s=None)),
    "finish_own": lambda conn: _by_key(update(_H)).where(_H.c.status == "started", _H.c.task_id == bindparam("k_task"))
    .values(_set(status="done", result=None, finished_at=None, duration_s=None, queued_s=None)),
    "recorded": lambda conn: _by_key(select(_H.c.result)).where(_H.c.status == "done"),
    "exists": lambda conn: _by_key(select(_H.c.status)),
}


def _run(session: Session, name: str, params: dict):
    conn = session.connection()
    return conn.execute(prepared(conn, f"ledger.{name}", _BUILD[name]), params)


def claim(session: Session, subject: str, step: int, hop: str, task_id: str) -> Claim:
    row = {"subject_id": subject, "step_index": step, "hop": hop, "task_id": task_id,
           "status": "started", "started_at": utcnow()}
    if _run(session, "insert", row).rowcount == 1:
        return Claim(NEW)
    key = _key(subject, step, hop)
    found = _run(session, "find", key).one()
    if found.status == "done":
        return Claim(DONE, found.result)
    if found.task_id != task_id:
        if found.task_id == ORPHANED and _run(session, "take_orphan", {
                **key, "v_task_id": task_id, "v_started_at": utcnow()}).rowcount == 1:
            return Claim(NEW)
        return Claim(BUSY)
    # Our own earlier delivery (it died half-way) or a Celery retry: do it again.
    _run(session, "retry", {**key, "v_started_at": utcnow()})
    return Claim(NEW)


def finish(session: Session, subject: str, step: int, hop: str, result: dict, duration_s: float | None = None,
           task_id: str | None = None, queued_s: float | None = None) -> bool:
    """Record the hop's result. False if another delivery recorded it first (roll back then).

    With `task_id`, only if the row is still that task's (not orphaned or taken over since).
    `duration_s` is the hop's work time, `queued_s` its message's wait in the queue before it.
    """
    params = {**_key(subject, step, hop), "v_result": result, "v_finished_at": utcnow(), "v_duration_s": duration_s,
              "v_queued_s": queued_s}
    if task_id is None:
        return _run(session, "finish", params).rowcount == 1
    return _run(session, "finish_own", {**params, "k_task": task_id}).rowcount == 1


def orphan(session: Session, subject: str, hops: tuple[str, ...]) -> int:
    """Release the `started` rows of `subject`'s `hops` from their (lost) holders; returns how many."""
    return session.execute(
        update(Hop).where(Hop.subject_id == subject, Hop.hop.in_(hops), Hop.status == "started")
        .values(task_id=ORPHANED)
    ).rowcount


def record(session: Session, subject: str, step: int, hop: str, task_id: str, result: dict | None,
           duration_s: float | None = None, queued_s: float | None = None) -> bool:
    """Insert a finished hop (work time `duration_s`, queue wait `queued_s`). False if already recorded (roll back then)."""
    now = utcnow()
    row = {"subject_id": subject, "step_index": step, "hop": hop, "task_id": task_id, "status": "done",
           "result": result, "started_at": now, "finished_at": now, "duration_s": duration_s,
           "queued_s": queued_s}
    return _run(session, "insert", row).rowcount == 1


def recorded(session: Session, subject: str, step: int, hop: str) -> dict | None:
    """The recorded result of a finished hop, or None."""
    return _run(session, "recorded", _key(subject, step, hop)).scalar()


def exists(session: Session, subject: str, step: int, hop: str) -> bool:
    return _run(session, "exists", _key(subject, step, hop)).first() is not None
