"""Tier-1 limits kept in the state database (PostgreSQL; SQLite for the embedded stack).

Admitting a call is one short transaction: lock the key's bucket row (``SELECT …
FOR UPDATE``; SQLite's ``BEGIN IMMEDIATE`` serializes writers already), read the
database's clock and the live slots, then charge the bucket and lease a slot. The
database's clock is the one clock every model host shares, so hosts' clock skew
cannot loosen a limit. Each key is one locked row, so one key admits some hundreds
of calls a second: far above what any model server serves.

The tables (`megaflow.db.tables`) come with migration 0002; `megaflow db upgrade` makes them.
"""

from __future__ import annotations

import logging

from sqlalchemy import Float, cast, delete, func, select, update
from sqlalchemy.orm import Session

from megaflow.db.engine import session_scope
from megaflow.db.sql import insert_ignore, upsert
from megaflow.db.tables import ModelBucket, ModelSlot
from megaflow.errors import RateLimitedError
from megaflow.ratelimit.base import Bucket, Lease, admit, full_bucket, reservation, settle
from megaflow.spec import ModelLimits

log = logging.getLogger(__name__)

#: Days between the Julian epoch SQLite counts from and the Unix epoch.
_UNIX_EPOCH_JULIAN_DAY = 2440587.5


def db_clock(session: Session):
    """A SQL expression for the database's current time in epoch seconds."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        # clock_timestamp(), not now(): now() is when the transaction began, before the lock wait.
        return cast(func.extract("epoch", func.clock_timestamp()), Float)
    if dialect == "sqlite":
        return (func.julianday("now") - _UNIX_EPOCH_JULIAN_DAY) * 86400.0
    raise NotImplementedError(f"MegaFlow supports PostgreSQL and SQLite, not {dialect}")


class SQLLimiter:
    """A `Limiter` on the state database.

    Args:
        db_url: SQLAlchemy URL of the state database (migrated to 0002 or later).
    """

    def __init__(self, db_url: str):
        self.db_url = db_url

    def acquire(self, key: str, limits: ModelLimits, holder: str, tokens: float) -> Lease:
        """Admit one call, or raise `RateLimitedError` with the wait.

        Raises:
            RateLimitedError: a limit is reached; `retry_after` seconds from now it may not be.
        """
        reserved = reservation(limits, tokens)
        with session_scope(self.db_url) as s:
            bucket = self._lock(s, key, limits)
            clock = db_clock(s)
            live = (
                select(func.count()).select_from(ModelSlot)
                .where(ModelSlot.key == key, ModelSlot.holder != holder, ModelSlot.expires > clock)
                .scalar_subquery()
            )
            now, in_flight = s.execute(select(clock, live)).one()
            bucket, wait = admit(bucket, limits, now, in_flight, reserved)
            if wait > 0:
                # Nothing to store (the refill is recomputed from `updated`): the raise rolls back.
                raise RateLimitedError(f"model limits of {key} reached ({in_flight} in flight)", retry_after=wait)
            self._store(s, key, bucket)
            # Expired slots belong to dead workers; clearing them here keeps the table small.
            s.execute(delete(ModelSlot).where(ModelSlot.key == key, ModelSlot.expires <= now))
            slot = {"key": key, "holder": holder, "started": now, "expires": now + limits.lease_s}
            s.execute(upsert(s.connection(), ModelSlot.__table__, slot, keys=["key", "holder"]))
        return Lease(key=key, holder=holder, limits=limits, reserved=reserved, started=now)

    def release(self, lease: Lease, used_tokens: float) -> None:
        """Free the call's slot and charge its real usage. Safe to call after the lease expired."""
        with session_scope(self.db_url) as s:
            bucket = self._lock(s, lease.key, lease.limits)
            now = s.execute(select(db_clock(s))).scalar_one()
            bucket = settle(bucket, lease.limits, now, lease.reserved, used_tokens, now - lease.started)
            self._store(s, lease.key, bucket)
            s.execute(delete(ModelSlot).where(ModelSlot.key == lease.key, ModelSlot.holder == lease.holder))

    def in_flight(self, key: str) -> int:
        """Live slots of `key` (for status pages and tests)."""
        with session_scope(self.db_url) as s:
            clock = db_clock(s)
            return s.execute(
                select(func.count()).select_from(ModelSlot).where(ModelSlot.key == key, ModelSlot.expires > clock)
            ).scalar_one()

    def close(self) -> None:
        """Nothing to do: connections belong to the process's engine."""

    def _lock(self, s: Session, key: str, limits: ModelLimits) -> Bucket:
        """The key's bucket, locked for this transaction; made full on first use."""
        query = select(ModelBucket.requests, ModelBucket.tokens, ModelBucket.updated, ModelBucket.latency_s).where(
            ModelBucket.key == key).with_for_update()
        row = s.execute(query).first()
        if row is None:
            now = s.execute(select(db_clock(s))).scalar_one()
            b = full_bucket(limits, now)
            values = {"key": key, "requests": b.requests, "tokens": b.tokens, "updated": b.updated,
                      "latency_s": b.latency_s}
            s.execute(insert_ignore(s.connection(), ModelBucket.__table__, values))
            row = s.execute(query).one()  # ours, or a racing worker's: locked either way
        return Bucket(*row)

    @staticmethod
    def _store(s: Session, key: str, b: Bucket) -> None:
        s.execute(update(ModelBucket).where(ModelBucket.key == key).values(
            requests=b.requests, tokens=b.tokens, updated=b.updated, latency_s=b.latency_s))
