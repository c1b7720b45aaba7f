"""The append-only events table."""

from __future__ import annotations

from sqlalchemy.orm import Session

from megaflow.db.models import Event


def emit(session: Session, kind: str, run_id: str | None = None, subject_id: str | None = None,
         data: dict | None = None) -> None:
    """Append one event in the caller's transaction (it commits with the change it describes)."""
    session.add(Event(kind=kind, run_id=run_id, subject_id=subject_id, data=data))
