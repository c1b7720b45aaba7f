"""Distributed counting semaphores on the state database.

A semaphore is a row (`key`, `limit`, `used`); each slot taken is a holder row, so
an acquire that is retried (a redelivered decision) never takes a second slot, and
a holder that vanished (its lease expired) can be released by a sweep.

Deadlocks: every acquire and release first updates the ``global`` row, so all
semaphore changes serialize on that one row lock instead of locking rows in
different orders. Keys are then taken in sorted order.

On PostgreSQL an acquire or release is one call of a server-side function
(migrations 0005, 0013) in a transaction of its own: the hot rows (``global``, a host's)
are locked only while the server runs it, not for the rest of the caller's
transaction with its client round trips — under load, every admission queued
behind the one holding them. The slots are therefore taken (given back) whether
or not the caller's transaction then commits: taking is idempotent per holder, and
a holder that goes no further is released by admission's repair sweep. Callers
give slots back after their own transaction commits (`megaflow.scheduler.admission.after_end`).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import delete, event, select, update
from sqlalchemy.orm import Session

from megaflow.db.models import Semaphore, SemaphoreHolder, utcnow
from megaflow.db.sql import dialect_insert, insert_ignore, upsert

GLOBAL = "global"


def host_key(host: str) -> str:
    return f"host:{host}"


def host_of(key: str) -> str:
    """The host a `host_key` names."""
    return key.removeprefix("host:")


def image_key(image: str) -> str:
    return f"image:{image}"


def quota_key(scope: str, name: str) -> str:
    return f"quota:{scope}:{name}"


#: Semaphore rows known to exist, per database: a row is never deleted, so each
#: process checks (inserts) a key once, not on every acquire. A key counts as known
#: only once the transaction that inserted it has committed: another thread that
#: skipped its own insert would otherwise find no row to count on, and read the
#: semaphore as full.
_known: set[tuple[str, str]] = set()
_PENDING = "megaflow.semaphores.inserted"


def _db(s: Session) -> str:
    return str(s.get_bind().url)


def _inserted(s: Session, key: str) -> None:
    s.info.setdefault(_PENDING, set()).add((_db(s), key))


@event.listens_for(Session, "after_commit")
def _committed(s: Session) -> None:
    _known.update(s.info.pop(_PENDING, ()))


@event.listens_for(Session, "after_rollback")
def _rolled_back(s: Session) -> None:
    s.info.pop(_PENDING, None)


def ensure(s: Session, key: str, limit: int | None = None) -> None:
    """Create the semaphore if it does not exist (an existing limit is kept)."""
    if (_db(s), key) in _known:
        return
    s.execute(insert_ignore(s.connection(), Semaphore.__table__, {"key": key, "limit": limit, "used": 0}))
    _inserted(s, key)


def set_limit(s: Session, key: str, limit: int | None) -> None:
    """Create the semaphore or change its limit (on PostgreSQL in a transaction of its own, like
    every change of a semaphore row there: none stays locked by a caller's transaction)."""
    def stmt(conn):
        return upsert(conn, Semaphore.__table__, {"key": key, "limit": limit, "used": 0}, ["key"], update=["limit"])

    if _server_side(s):
        with _own_transaction(s) as conn:
            conn.execute(stmt(conn))
        return
    s.execute(stmt(s.connection()))
    _inserted(s, key)


def _room(keys):
    return Semaphore.key.in_(keys) & (Semaphore.limit.is_(None) | (Semaphore.used < Semaphore.limit))


def acquire(s: Session, keys: list[str], holder: str, expires_at: dt.datetime | None = None) -> str | None:
    """Take one slot of every key for `holder`, all or none.

    Three statements whatever the number of keys: the holder rows (a key already
    held by `holder` is not taken twice), the global row (the lock every change
    takes first), the other rows.

    Returns:
        None when all are held now; else the first key that is full (nothing taken).
    """
    keys = sorted(set(keys) | {GLOBAL})
    now = utcnow()
    if _server_side(s):
        return _call(s, "SELECT megaflow_acquire(%(keys)s, %(holder)s, %(now)s, %(expires)s)",
                     {"keys": keys, "holder": holder, "now": now, "expires": expires_at})[0]
    for key in keys:
        ensure(s, key)
    conn = s.connection()
    ins = dialect_insert(conn, SemaphoreHolder.__table__).values(
        [{"key": k, "holder": holder, "acquired_at": now, "expires_at": expires_at} for k in keys])
    new = set(conn.execute(ins.on_conflict_do_nothing().returning(SemaphoreHolder.key)).scalars())
    took: list[str] = []
    full = None
    if GLOBAL in new:
        if conn.execute(update(Semaphore).where(_room([GLOBAL])).values(used=Semaphore.used + 1)).rowcount:
            took.append(GLOBAL)
        else:
            full = GLOBAL
    rest = sorted(new - {GLOBAL})
    if rest and full is None:
        took += conn.execute(update(Semaphore).where(_room(rest)).values(used=Semaphore.used + 1)
                             .returning(Semaphore.key)).scalars().all()
        missing = sorted(set(rest) - set(took))
        full = missing[0] if missing else None
    if full is None:
        return None
    _give(conn, took)
    conn.execute(delete(SemaphoreHolder).where(SemaphoreHolder.holder == holder, SemaphoreHolder.key.in_(new)))
    return full


def acquire_least_used(s: Session, keys: list[str], choices: list[str], holder: str,
                       expires_at: dt.datetime | None = None,
                       preferred: list[str] | None = None) -> tuple[str | None, str | None]:
    """Take a slot of every key and of one of `choices`, all or none: the choice `holder`
    already has, else the least used for its limit, those in `preferred` first, ties by key.

    The loads are read under the ``global`` row's lock: read before it, admissions that
    run at once all see the same loads and all go for the same choice.

    Returns:
        (the choice taken, None); (None, the first full key of `keys`); (None, None) when
        every choice is full.
    """
    keys = sorted(set(keys) | {GLOBAL})
    now = utcnow()
    if _server_side(s):
        taken, full = _call(s, "SELECT taken, full_key FROM megaflow_acquire_least_used(%(keys)s, %(choices)s, "
                            "%(preferred)s, %(holder)s, %(now)s, %(expires)s)",
                            {"keys": keys, "choices": list(choices), "preferred": list(preferred or []),
                             "holder": holder, "now": now, "expires": expires_at})
        return taken, full
    for key in [*keys, *choices]:
        ensure(s, key)
    conn = s.connection()
    conn.execute(update(Semaphore).where(Semaphore.key == GLOBAL).values(used=Semaphore.used))  # the lock
    loads = {k: (u, lim) for k, u, lim in conn.execute(
        select(Semaphore.key, Semaphore.used, Semaphore.limit).where(Semaphore.key.in_(choices)))}
    mine = set(held(s, holder)) & set(choices)
    order = sorted((k for k in loads if k in mine or loads[k][1] is None or loads[k][0] < loads[k][1]),
                   key=lambda k: (k not in mine, k not in (preferred or ()),
                                  0 if loads[k][1] is None else loads[k][0] / max(1, loads[k][1]), k))
    for choice in order:
        full = acquire(s, [*keys, choice], holder, expires_at)
        if full is None:
            return choice, None
        if full != choice:
            return None, full
    return None, None


def _give(conn, keys: list[str]) -> None:
    """Count one slot fewer on each key: the global row first, like every acquire."""
    if GLOBAL in keys:
        conn.execute(update(Semaphore).where(Semaphore.key == GLOBAL, Semaphore.used > 0)
                     .values(used=Semaphore.used - 1))
    rest = sorted(set(keys) - {GLOBAL})
    if rest:
        conn.execute(update(Semaphore).where(Semaphore.key.in_(rest), Semaphore.used > 0)
                     .values(used=Semaphore.used - 1))


def release_all(s: Session, holder: str, only: list[str] | None = None) -> list[str]:
    """Give back every slot `holder` has (or those of the keys `only`); returns their keys
    (empty: it held none)."""
    if _server_side(s):
        return sorted(_call(s, "SELECT megaflow_release(%(holder)s, %(keys)s)", {"holder": holder, "keys": only})[0])
    conn = s.connection()
    which = SemaphoreHolder.holder == holder
    if only is not None:
        which &= SemaphoreHolder.key.in_(only)
    keys = sorted(conn.execute(delete(SemaphoreHolder).where(which).returning(SemaphoreHolder.key)).scalars())
    if keys:
        _give(conn, keys)
    return keys


def _server_side(s: Session) -> bool:
    return s.get_bind().dialect.name == "postgresql"


def _own_transaction(s: Session):
    """A pooled connection of `s`'s engine in autocommit: each statement its own transaction."""
    return s.get_bind().connect().execution_options(isolation_level="AUTOCOMMIT")


def _call(s: Session, sql: str, params: dict):
    """Run one semaphore function in a transaction of its own: one round trip, commit included;
    returns its row.

    Sent with ``SET LOCAL synchronous_commit TO OFF`` in the same message (one implicit
    transaction), so the rows are not held locked through a WAL flush. Safe because the
    WAL is flushed in order: whatever durable state rests on a slot (the decision that
    moves the episode on, committed after this) makes this commit durable too; a release
    lost in a server crash leaves an ended holder that the repair sweep frees.
    """
    with _own_transaction(s) as conn:
        return conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF; " + sql, params).one()


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
