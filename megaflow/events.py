"""The append-only events table."""

from __future__ import annotations

from sqlalchemy.orm import Session

from megaflow.db.models import Event
from megaflow.redact import redact


def emit(session: Session, kind: str, run_id: str | None = None, subject_id: str | None = None,
         data: dict | None = None) -> None:
    """Append one event in the caller's transaction (it commits with the change it describes).

    Anything that looks like a credential in `data` is masked (`megaflow.redact`).
    """
    session.add(Event(kind=kind, run_id=run_id, subject_id=subject_id, data=redact(data) if data else data))
