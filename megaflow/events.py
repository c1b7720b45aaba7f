"""The append-only events table."""

from __future__ import annotations

from sqlalchemy import insert
from sqlalchemy.orm import Session

from megaflow.db.models import Event
from megaflow.db.sql import prepared
from megaflow.redact import redact

_EVENTS = Event.__table__


def emit(session: Session, kind: str, run_id: str | None = None, subject_id: str | None = None,
         data: dict | None = None) -> None:
    """Append one event in the caller's transaction (it commits with the change it describes).

    Anything that looks like a credential in `data` is masked (`megaflow.redact`).
    A prepared Core insert, not an ORM object (a unit-of-work flush at commit):
    every ending episode emits one.
    """
    conn = session.connection()
    conn.execute(prepared(conn, "events.insert", lambda c: insert(_EVENTS)),
                 {"kind": kind, "run_id": run_id, "subject_id": subject_id, "data": redact(data) if data else data})
