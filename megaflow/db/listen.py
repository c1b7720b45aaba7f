"""Sleep until PostgreSQL notifies a channel, or a time passes: waiting without polling.

Where the database is SQLite (no notifications) a wait is a plain sleep.
"""

from __future__ import annotations

import select
import time
from typing import Self

from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool


class Listener:
    """One connection of its own, outside any pool, LISTENing on `channel` (PostgreSQL).

    Args:
        db_url: The database; anything but PostgreSQL makes `wait` a sleep.
        channel: The channel's name (quoted as given).
    """

    def __init__(self, db_url: str, channel: str):
        self._engine = self._raw = None
        if db_url.startswith("postgresql"):
            self._engine = create_engine(db_url, poolclass=NullPool)
            self._raw = self._engine.raw_connection()
            conn = self._raw.driver_connection
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'LISTEN "{channel}"')

    @property
    def connection(self):
        """The listening psycopg2 connection (autocommit), e.g. for a session's advisory lock; None on SQLite."""
        return None if self._raw is None else self._raw.driver_connection

    def drain(self) -> None:
        """Forget the notifications received so far."""
        if self._raw is not None:
            self.connection.poll()
            self.connection.notifies.clear()

    def wait(self, seconds: float | None) -> bool:
        """Return on the next notification (True) or after `seconds` (False); notifications are consumed.

        `seconds` None waits for a notification however long it takes (PostgreSQL only).
        """
        if self._raw is None:
            time.sleep(max(0.0, seconds))
            return False
        conn = self.connection
        conn.poll()
        if not conn.notifies:
            # The connection's socket becomes readable when a notification arrives.
            select.select([conn], [], [], None if seconds is None else max(0.0, seconds))
            conn.poll()
        woken = bool(conn.notifies)
        conn.notifies.clear()
        return woken

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._engine.dispose()
            self._raw = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

