"""Dialect-aware INSERT … ON CONFLICT helpers (PostgreSQL and SQLite) and statements built once per process."""

from __future__ import annotations

from sqlalchemy import Table, bindparam, update
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


def update_where(conn, table: Table, key: dict, values: dict) -> int:
    """UPDATE `table` SET `values` WHERE every `key` column equals its value; returns the rowcount.

    The statement is built once per process for each table, key and set of columns (`prepared`).
    """
    cols, keys = sorted(values), sorted(key)
    stmt = prepared(conn, f"update.{table.name}:{','.join(keys)}:{','.join(cols)}", lambda c: update(table).where(
        *(table.c[k] == bindparam(f"k_{k}") for k in keys)).values(
        {k: bindparam(f"v_{k}", type_=table.c[k].type) for k in cols}))
    return conn.execute(stmt, {**{f"k_{k}": v for k, v in key.items()},
                               **{f"v_{k}": v for k, v in values.items()}}).rowcount


class Tracked:
    """A row read with Core: its columns as attributes; those set since are kept in `changes`.

    The one shape of a row the hops and the scheduler pass around (an episode, a
    step); the ORM classes of `megaflow.db.models` are for code that loads objects.
    """

    def __init__(self, values):
        self.__dict__.update(values)
        self.__dict__["changes"] = {}

    def __setattr__(self, name: str, value) -> None:
        self.__dict__[name] = value
        self.changes[name] = value
