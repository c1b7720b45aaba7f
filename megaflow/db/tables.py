"""Every table of the state database on one metadata: what Alembic's migrations must make.

The pipeline's own models live in `megaflow.db.models`; this module adds the tables of
the two components that share its database, the rate limiter (`megaflow.ratelimit.sql`)
and the Celery result backend (`megaflow.chord_backend`), to the same ``Base.metadata``.
The migration environment imports this module alone, so autogenerate compares one
metadata with the database, and no migration imports a service module.
"""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Float, Integer, String, Table, Text
from sqlalchemy.orm import Mapped, mapped_column

from megaflow.db.models import Base  # the pipeline's models, on this metadata

#: All of MegaFlow's tables (migrations' ``target_metadata``).
metadata = Base.metadata

__all__ = ["metadata", "ModelBucket", "ModelSlot", "results_table", "chords_table", "parts_table"]


# -- the rate limiter (migration 0002) ------------------------------------------------


class ModelBucket(Base):
    """The token buckets of one limit key (a run or a user)."""

    __tablename__ = "model_buckets"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    requests: Mapped[float] = mapped_column(Float)
    tokens: Mapped[float] = mapped_column(Float)
    # Seconds since the Unix epoch, on the database's clock.
    updated: Mapped[float] = mapped_column(Float)
    # Running mean of call durations: how long a caller waits for a free slot.
    latency_s: Mapped[float] = mapped_column(Float)


class ModelSlot(Base):
    """One model call in flight, leased until `expires` (database clock)."""

    __tablename__ = "model_slots"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200), primary_key=True)
    started: Mapped[float] = mapped_column(Float)
    expires: Mapped[float] = mapped_column(Float)


# -- the Celery result backend (migration 0007) -----------------------------------------

#: Task and group results, by Celery's key.
results_table = Table(
    "megaflow_results",
    metadata,
    Column("key", String(255), primary_key=True),
    Column("value", Text, nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True, index=True),
)
#: One counter per chord: members counted (`done`) against its `size`.
chords_table = Table(
    "megaflow_chords",
    metadata,
    Column("group_id", String(64), primary_key=True),
    Column("size", Integer, nullable=True),
    Column("done", Integer, nullable=False, default=0),
    Column("closed_at", DateTime(timezone=True), nullable=True),
    Column("fired_at", DateTime(timezone=True), nullable=True),
)
#: One row per member that returned: a redelivered member inserts nothing.
parts_table = Table(
    "megaflow_chord_parts",
    metadata,
    Column("group_id", String(64), primary_key=True),
    Column("task_id", String(64), primary_key=True),
    Column("idx", Integer, nullable=True),
    Column("state", String(20), nullable=False),
    Column("result", Text, nullable=False),
)
