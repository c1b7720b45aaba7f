"""A consumer's death, made a notification: what wakes the others to take its batch over.

Each batch consumer holds a session advisory lock on its key while it lives
(`megaflow.rl.handoff`). A consumer waiting while another holds batches asks for a
*shared* lock on that key from a thread of its own: PostgreSQL grants it only when
the holder's connection is gone (the process killed, or the stream closed), and the
thread then releases it and notifies the run's channel, so every waiting consumer
looks again — no polling for the dead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

#: The advisory-lock namespace of batch consumers (first key of the two-key form): "MFRL".
LOCK_SPACE = 0x4D46524C


class DeathWatch:
    """Threads that each wait for one consumer key's lock to be free, then notify `channel`.

    Args:
        db_url: The state database (PostgreSQL).
        channel: The run's notification channel.
    """

    def __init__(self, db_url: str, channel: str):
        self._engine = create_engine(db_url, poolclass=NullPool)
        self._error = self._engine.dialect.dbapi.Error
        self._channel = channel
        self._watched: dict[int, tuple[threading.Thread, object]] = {}

    def watch(self, keys: Iterable[int]) -> None:
        """Watch each key not watched already (one thread and one connection per key)."""
        for key in keys:
            current = self._watched.get(key)
            if current is not None and current[0].is_alive():
                continue
            raw = self._engine.raw_connection()
            raw.driver_connection.autocommit = True
            thread = threading.Thread(target=self._wait_for, args=(raw, key), daemon=True,
                                      name=f"megaflow-rl-watch-{key}")
            self._watched[key] = (thread, raw)
            thread.start()

    def _wait_for(self, raw, key: int) -> None:
        try:
            with raw.driver_connection.cursor() as cur:
                cur.execute("SELECT pg_advisory_lock_shared(%s, %s)", (LOCK_SPACE, key))
                # Released before the others are woken, so their takeover finds the key free.
                cur.execute("SELECT pg_advisory_unlock_shared(%s, %s)", (LOCK_SPACE, key))
                cur.execute("SELECT pg_notify(%s, 'consumer gone')", (self._channel,))
        except self._error as exc:  # cancelled by close(), or the database went away: nobody to wake
            log.debug("watch of consumer %s ended: %s", key, exc)
        finally:
            raw.close()

    def close(self) -> None:
        """Stop every watch (each waiting query is cancelled) and release the connections."""
        for _, raw in self._watched.values():
            try:
                raw.driver_connection.cancel()
            except (self._error, AttributeError):  # already closed by its thread
                pass
        for thread, _ in self._watched.values():
            thread.join(timeout=5)
        self._watched.clear()
        self._engine.dispose()
