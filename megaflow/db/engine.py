"""Engines and sessions, per process.

Celery's prefork pool forks workers after import, and a connection pool must
never cross a fork, so engines are cached per (url, pid).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

_lock = threading.Lock()
_engines: dict[tuple[str, int], Engine] = {}


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # Hand transaction control to SQLAlchemy (see the "begin" listener below).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    # WAL lets the three local worker processes read while one writes.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    """A new engine for `url` with settings that suit many worker processes."""
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling defers BEGIN; take the write lock at
        # BEGIN so two writers queue on busy_timeout instead of deadlocking.
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine
    # No pre-ping (it doubles round trips per hop); a dropped connection raises
    # OperationalError, the pool is invalidated, and the hop task retries.
    return create_engine(url, pool_size=10, max_overflow=20, pool_recycle=1800)


def get_engine(url: str) -> Engine:
    """The engine for `url` in this process (created on first use)."""
    key = (url, os.getpid())
    engine = _engines.get(key)
    if engine is None:
        with _lock:
            engine = _engines.get(key)
            if engine is None:
                engine = _engines[key] = make_engine(url)
    return engine


def dispose_all() -> None:
    """Drop every engine of this process (tests, and after a fork)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=False)
        _engines.clear()
        _factories.clear()


_factories: dict[tuple[str, int, bool], sessionmaker] = {}
_depth = threading.local()


class NestedSQLiteTransaction(RuntimeError):
    """A second SQLite transaction was opened in a thread that already holds one.

    Every SQLite transaction here takes the write lock (BEGIN IMMEDIATE), so the
    inner one would wait on the outer until the busy timeout: fail fast instead.
    """


@contextmanager
def session_scope(url: str, readonly: bool = False) -> Iterator[Session]:
    """A session that commits on success and rolls back on error.

    `readonly` (PostgreSQL): statements run in autocommit, with no BEGIN and COMMIT
    round trips; for reads that need no snapshot shared between them.
    """
    sqlite = url.startswith("sqlite")
    readonly = readonly and not sqlite
    key = (url, os.getpid(), readonly)
    factory = _factories.get(key)
    if factory is None:
        engine = get_engine(url)
        if readonly:
            engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        factory = _factories[key] = sessionmaker(bind=engine, expire_on_commit=False)
    if sqlite:
        if getattr(_depth, "n", 0):
            raise NestedSQLiteTransaction("nested session on SQLite: load what you need before opening one")
        _depth.n = 1
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
        if sqlite:
            _depth.n = 0
