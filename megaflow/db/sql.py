"""Dialect-aware INSERT … ON CONFLICT helpers (PostgreSQL and SQLite)."""

from __future__ import annotations

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite


def dialect_insert(conn, table: Table):
    """The INSERT construct of the connection's dialect (it has ON CONFLICT)."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"MegaFlow supports PostgreSQL and SQLite, not {dialect}")


def insert_ignore(conn, table: Table, values: dict):
    """INSERT that does nothing when the primary key already exists (rowcount 0)."""
    return dialect_insert(conn, table).values(**values).on_conflict_do_nothing()


def upsert(conn, table: Table, values: dict, keys: list[str], update: list[str] | None = None):
    """INSERT, or UPDATE the `update` columns (default: all non-key columns) on conflict."""
    stmt = dialect_insert(conn, table).values(**values)
    cols = update if update is not None else [c for c in values if c not in keys]
    return stmt.on_conflict_do_update(index_elements=keys, set_={c: stmt.excluded[c] for c in cols})


_prepared: dict[tuple[str, str], object] = {}


def prepared(conn, name: str, build):
    """A statement built once per process and dialect: ``build(conn)`` on first use, cached under `name`.

    Hot paths run the same few statements for every hop. Building one (column
    comparisons, coercions) and deriving its cache key cost more Python time than
    executing it; a statement made once with `bindparam` placeholders skips both
    (its cache key is memoized on the object).
    """
    key = (conn.dialect.name, name)
    stmt = _prepared.get(key)
    if stmt is None:
        stmt = _prepared[key] = build(conn)
    return stmt
