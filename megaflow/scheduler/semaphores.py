"""Distributed counting semaphores on the state database.

A semaphore is a row (`key`, `limit`, `used`); each slot taken is a holder row, so
an acquire that is retried (a redelivered decision) never takes a second slot, and
a holder that vanished (its lease expired) can be released by a sweep.

Deadlocks: every acquire and release first updates the ``global`` row, so all
semaphore changes serialize on that one row lock instead of locking rows in
different orders. Keys are then taken in sorted order.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from megaflow.db.models import Semaphore, SemaphoreHolder, utcnow
from megaflow.db.sql import insert_ignore, upsert

GLOBAL = "global"


def host_key(host: str) -> str:
    return f"host:{host}"


def image_key(image: str) -> str:
    return f"image:{image}"


def quota_key(scope: str, name: str) -> str:
    return f"quota:{scope}:{name}"


def ensure(s: Session, key: str, limit: int | None = None) -> None:
    """Create the semaphore if it does not exist (an existing limit is kept)."""
    s.execute(insert_ignore(s.connection(), Semaphore.__table__, {"key": key, "limit": limit, "used": 0}))


def set_limit(s: Session, key: str, limit: int | None) -> None:
    s.execute(upsert(s.connection(), Semaphore.__table__, {"key": key, "limit": limit, "used": 0}, ["key"],
                     update=["limit"]))


def _take(s: Session, key: str, holder: str, expires_at: dt.datetime | None) -> bool | None:
    """One slot of `key`: True taken, None already held by `holder`, False full."""
    ensure(s, key)
    row = {"key": key, "holder": holder, "acquired_at": utcnow(), "expires_at": expires_at}
    if s.execute(insert_ignore(s.connection(), SemaphoreHolder.__table__, row)).rowcount == 0:
        return None
    took = s.execute(update(Semaphore).where(
        Semaphore.key == key, (Semaphore.limit.is_(None)) | (Semaphore.used < Semaphore.limit))
        .values(used=Semaphore.used + 1)).rowcount == 1
    if not took:
        s.execute(delete(SemaphoreHolder).where(SemaphoreHolder.key == key, SemaphoreHolder.holder == holder))
    return took


def acquire(s: Session, keys: list[str], holder: str, expires_at: dt.datetime | None = None) -> str | None:
    """Take one slot of every key for `holder`, all or none.

    Returns:
        None when all are held now; else the first key that is full (nothing taken).
    """
    taken = []
    for key in sorted(set(keys) | {GLOBAL}):
        ok = _take(s, key, holder, expires_at)
        if ok is False:
            _give(s, taken, holder)
            return key
        if ok:
            taken.append(key)
    return None


def _give(s: Session, keys: list[str], holder: str) -> None:
    for key in sorted(keys):
        if s.execute(delete(SemaphoreHolder).where(
                SemaphoreHolder.key == key, SemaphoreHolder.holder == holder)).rowcount == 1:
            s.execute(update(Semaphore).where(Semaphore.key == key, Semaphore.used > 0)
                      .values(used=Semaphore.used - 1))


def release_all(s: Session, holder: str) -> list[str]:
    """Give back every slot `holder` has; returns their keys (empty: it held none)."""
    keys = list(s.execute(select(SemaphoreHolder.key).where(SemaphoreHolder.holder == holder)).scalars())
    # Sorted, "global" comes first: the same lock order as every acquire.
    _give(s, keys, holder)
    return sorted(keys)


def held(s: Session, holder: str) -> list[str]:
    return sorted(s.execute(select(SemaphoreHolder.key).where(SemaphoreHolder.holder == holder)).scalars())


def expired_holders(s: Session, now: dt.datetime | None = None) -> list[str]:
    """Holders with a slot whose lease ran out (their episode was lost)."""
    now = now or utcnow()
    return sorted(set(s.execute(select(SemaphoreHolder.holder).where(
        SemaphoreHolder.expires_at.is_not(None), SemaphoreHolder.expires_at < now)).scalars()))


def usage(s: Session, prefix: str = "") -> dict[str, tuple[int, int | None]]:
    """{key: (used, limit)} of the semaphores whose key starts with `prefix`."""
    rows = s.execute(select(Semaphore.key, Semaphore.used, Semaphore.limit).where(Semaphore.key.startswith(prefix)))
    return {k: (u, lim) for k, u, lim in rows}
