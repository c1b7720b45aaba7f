"""A Celery result backend on SQL (PostgreSQL or SQLite) with an event-driven chord join.

Celery's stock database backend joins chords by polling (``chord_unlock``
re-queued every second). This backend joins at Celery's
``on_chord_part_return`` extension point instead:

* each finishing member inserts ``(group_id, task_id)`` into a parts table —
  a redelivered member inserts nothing, so a duplicate can never close a chord
  early (Redis' INCR counts duplicates twice);
* in the same transaction an atomic ``UPDATE … SET done = done + 1 RETURNING``
  counts it; the member that reaches ``size`` sends the body at once.

Select it with ``result_backend = "megaflow.chord_backend:SQLChordBackend+<sqlalchemy url>"``.
Its tables (`megaflow.db.tables`) come with migration 0007: the database must be
upgraded (``megaflow db upgrade``; the embedded stack does it) before it is used.
"""

from __future__ import annotations

import datetime as dt
import logging
import time

from celery import states
from celery.backends.base import KeyValueStoreBackend
from celery.canvas import maybe_signature
from sqlalchemy import delete, inspect, select, update
from sqlalchemy.exc import InterfaceError, OperationalError

from megaflow.db.engine import get_engine
from megaflow.db.sql import dialect_insert, insert_ignore, upsert
from megaflow.db.tables import chords_table, parts_table, results_table

log = logging.getLogger(__name__)

class SchemaMissing(RuntimeError):
    """The result backend's tables are not in the database: its schema was never upgraded."""


def check_tables(engine) -> None:
    """Raise `SchemaMissing` unless the backend's tables exist (migration 0007 makes them).

    Raises:
        SchemaMissing: with the one command that fixes it.
    """
    names = (results_table.name, chords_table.name, parts_table.name)
    missing = [n for n in names if not inspect(engine).has_table(n)]
    if missing:
        raise SchemaMissing(f"result backend tables {', '.join(missing)} missing from {engine.url!r}: "
                            "run `megaflow db upgrade`")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class SQLChordBackend(KeyValueStoreBackend):
    """Task results in a key/value table; chords joined by an idempotent counter."""

    supports_native_join = False
    implements_incr = False

    def __init__(self, url: str | None = None, **kwargs):
        super().__init__(url=url, **kwargs)
        if not url:
            raise ValueError("SQLChordBackend needs a SQLAlchemy URL")
        self.dburl = url
        self._tables_ready = False

    def __reduce__(self, args=(), kwargs=None):
        return super().__reduce__(args, dict(kwargs or {}, url=self.dburl))

    @property
    def engine(self):
        engine = get_engine(self.dburl)
        if not self._tables_ready:
            check_tables(engine)  # the schema is Alembic's (`megaflow db upgrade`), never made here
            self._tables_ready = True
        return engine

    # -- key/value storage used by Celery for task and group results --------------

    def get(self, key):
        key = self._text(key)
        with self.engine.connect() as conn:
            return conn.execute(select(results_table.c.value).where(results_table.c.key == key)).scalar()

    def mget(self, keys):
        keys = [self._text(k) for k in keys]
        with self.engine.connect() as conn:
            rows = dict(conn.execute(select(results_table.c.key, results_table.c.value)
                                     .where(results_table.c.key.in_(keys))).all())
        return [rows.get(k) for k in keys]

    def set(self, key, value):
        expires = _now() + dt.timedelta(seconds=self.expires) if self.expires else None
        row = {"key": self._text(key), "value": self._text(value), "expires_at": expires}
        with self.engine.begin() as conn:
            conn.execute(upsert(conn, results_table, row, ["key"]))

    def delete(self, key):
        with self.engine.begin() as conn:
            conn.execute(delete(results_table).where(results_table.c.key == self._text(key)))

    def cleanup(self):
        with self.engine.begin() as conn:
            conn.execute(delete(results_table).where(results_table.c.expires_at < _now()))

    @staticmethod
    def _text(value) -> str:
        return value.decode() if isinstance(value, bytes) else value

    # -- chords -------------------------------------------------------------------

    def apply_chord(self, header_result_args, body, **kwargs):
        """Nothing to schedule: the join happens when members return (no chord_unlock)."""
        self.ensure_chords_allowed()

    def set_chord_size(self, group_id, chord_size):
        with self.engine.begin() as conn:
            conn.execute(upsert(conn, chords_table, {"group_id": group_id, "size": chord_size, "done": 0},
                                ["group_id"], update=["size"]))

    def on_chord_part_return(self, request, state, result, **kwargs):
        gid, tid = request.group, request.id
        if not gid or not tid or not request.chord:
            return
        # Nothing may escape from here: Celery would fail the member's task and
        # dead-letter its message, and the chord would never close. An error is
        # logged and recorded against the chord's group or run (event ``chord.error``);
        # a chord left open by one is closed by the scheduler's repair sweep
        # (`megaflow.scheduler.chords`).
        try:
            if state != states.SUCCESS:
                _retrying(lambda: self._end_failed_episode(request, result), f"chord {gid} member {tid}")
            encoded = self._text(self.encode({"result": self.encode_result(result, state)}))
            # The member has finished and its message is about to be acknowledged: a
            # database restart now must not lose its count (the chord would never close).
            closing = _retrying(lambda: self._count(request, gid, tid, state, encoded), f"chord {gid} join")
            if closing:
                _retrying(lambda: self._fire(gid, request.chord), f"chord {gid} body")
        except Exception as exc:  # noqa: BLE001 - see above
            log.error("chord %s: join of member %s failed", gid, tid, exc_info=True)
            self._record_error(gid, request.chord, {"member": tid, "error": f"{type(exc).__name__}: {exc}"})

    def _end_failed_episode(self, request, result) -> None:
        """End, ``infra_failed``, the episode of a member whose task failed past every containment.

        The member returns to its chord (below) and the chord closes: its episode must not
        stay ``running`` behind a closed run, with nothing in flight. A chaos run found one:
        a hop whose message was given up (dead-lettered) while its episode was mid-way.
        An episode already terminal is left as it is (a compare-and-set).
        """
        from sqlalchemy.orm import Session

        from megaflow.db import states as episode_states
        from megaflow.db.models import Episode
        from megaflow.db.states import ExitStatus
        from megaflow.events import emit
        from megaflow.redact import redact_text

        ids = [a for a in (getattr(request, "args", None) or ()) if isinstance(a, str) and len(a) == 32]
        if not ids:
            return
        what = getattr(request, "task", None) or "a task"
        error = redact_text(f"{what} failed and was given up: {type(result).__name__}: {result}")[:2000]
        with Session(self.engine) as s, s.begin():
            run_id = s.execute(select(Episode.run_id).where(Episode.id == ids[-1])).scalar()
            if run_id and episode_states.move(s, ids[-1], episode_states.INFRA_FAILED, exit_status=ExitStatus.HOP_CRASHED,
                                              error=error):
                emit(s, "episode.ended", run_id, ids[-1], {"state": episode_states.INFRA_FAILED,
                                                            "exit_status": ExitStatus.HOP_CRASHED, "error": error})
                log.error("episode %s ended infra_failed: %s", ids[-1], error)

    def _count(self, request, gid: str, tid: str, state, encoded: str) -> bool:
        """Count the member once; True when the chord is closed and its body not yet sent."""
        with self.engine.begin() as conn:
            fresh = conn.execute(insert_ignore(conn, parts_table, {
                "group_id": gid, "task_id": tid, "idx": request.group_index, "state": state, "result": encoded,
            })).rowcount
            if not fresh:
                log.info("chord %s: member %s already counted (redelivery)", gid, tid)
                # Counted by an attempt whose commit went through but whose answer was
                # lost (a restart): if that closed the chord, send the body now. A body
                # sent twice is harmless: callbacks are ledgered, and their own chord
                # counts the body's task id once.
                row = conn.execute(select(chords_table.c.closed_at, chords_table.c.fired_at)
                                   .where(chords_table.c.group_id == gid)).first()
                return row is not None and row.closed_at is not None and row.fired_at is None
            # One atomic statement: creating the counter row and counting must not
            # race (two first members could otherwise both miss the row).
            count = dialect_insert(conn, chords_table).values(
                group_id=gid, size=request.chord.get("chord_size"), done=1)
            row = conn.execute(count.on_conflict_do_update(
                index_elements=["group_id"], set_={"done": chords_table.c.done + 1},
            ).returning(chords_table.c.done, chords_table.c.size)).first()
            done, size = row
            closing = size is not None and done == size
            if closing:
                conn.execute(update(chords_table).where(chords_table.c.group_id == gid).values(closed_at=_now()))
            return closing

    def _fire(self, gid: str, chord_body) -> None:
        callback = maybe_signature(chord_body, app=self.app)
        with self.engine.connect() as conn:
            parts = conn.execute(
                select(parts_table.c.task_id, parts_table.c.state, parts_table.c.result)
                .where(parts_table.c.group_id == gid).order_by(parts_table.c.idx)
            ).all()
        values = []
        for tid, st, raw in parts:
            value = self.decode(raw)["result"]
            if st != states.SUCCESS:
                # A member that failed (a bug outside a hop's own containment) still
                # counts as returned: the body fires, and reads the episodes' states
                # from the database. Celery's way (the body fails with a ChordError)
                # would leave the group and the run open forever.
                log.error("chord %s: member %s ended in state %s; the body fires all the same", gid, tid, st)
                self._record_error(gid, chord_body, {"member": tid, "state": st, "result": str(value)[:500]})
                value = {"error": f"member {tid} ended in state {st}", "state": st, "task_id": tid}
            values.append(value)
        self.app.amqp._retry_publish(callback.delay, values)
        with self.engine.begin() as conn:
            conn.execute(update(chords_table).where(chords_table.c.group_id == gid).values(fired_at=_now()))

    def _record_error(self, gid: str, chord_body, data: dict) -> None:
        """Record a ``chord.error`` event against the chord body's group or run; best effort."""
        from megaflow.events import emit

        try:
            body = maybe_signature(chord_body, app=self.app) if chord_body else None
            args = list(getattr(body, "args", None) or ())
            subject = args[1] if body is not None and len(args) > 1 and isinstance(args[0], list) else (
                args[0] if args else None)
            subject = subject if isinstance(subject, str) else None
            from sqlalchemy.orm import Session

            with Session(self.engine) as s, s.begin():
                run_id = subject if body is not None and body.task == "megaflow.run.done" else None
                if subject and run_id is None:
                    from megaflow.db.models import RolloutGroup

                    run_id = s.execute(select(RolloutGroup.run_id).where(RolloutGroup.id == subject)).scalar()
                emit(s, "chord.error", run_id, subject, {"chord": gid, "task": getattr(body, "task", None), **data})
        except Exception:  # noqa: BLE001 - the log line above already says what happened
            log.warning("chord %s: could not record the chord.error event", gid, exc_info=True)


#: How long a chord join keeps trying through a database outage (below the decisions' time limit).
JOIN_RETRY_S = 180.0


def _retrying(fn, what: str, budget_s: float = JOIN_RETRY_S):
    """Run `fn`, retrying with backoff while the database is unreachable (a restart, a failover)."""
    deadline = time.monotonic() + budget_s
    delay = 0.2
    while True:
        try:
            return fn()
        except (OperationalError, InterfaceError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s: database unreachable (%s); again in %.1fs", what, type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(5.0, delay * 2)
