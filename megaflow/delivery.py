"""Bad messages never crash-loop a worker: poison tasks are capped, malformed ones dead-lettered.

* **Poison tasks.** A message whose processing keeps killing its worker (or timing
  out) comes back from RabbitMQ again and again, flagged ``redelivered``. Each
  execution of a redelivered message is counted in the ``deliveries`` table (first
  deliveries write nothing, so a message's deliveries are its count + 1). This is
  the one delivery count and ``Settings.hop_max_deliveries`` the one limit (the hops
  ledger counts nothing). Past the limit, an episode's hop or decision ends the
  episode as ``infra_failed`` (exit status ``poison``, the hop named) so its chord
  still closes: a hop's poison result is recorded in the hops
  ledger (a later delivery replays it; a result recorded before wins) and handed to
  the episode's next decision. A few more, or any other task past the limit, and the
  message is rejected without requeue: RabbitMQ dead-letters it into
  ``megaflow.dead``. Either way a ``task.poison`` event and an error log say so.
* **Malformed messages.** Celery acknowledges a body it cannot decode (dropped, with
  a log line); `DeadLetteringConsumer` rejects it instead, so it lands in
  ``megaflow.dead`` for inspection. Unknown tasks, messages that are not Celery
  messages, and disallowed content types (pickle) are already rejected by Celery.
  Task failures are rejected too (``task_acks_on_failure_or_timeout=False``).
"""

from __future__ import annotations

import hashlib
import json
import logging

from celery import Task
from celery.exceptions import Reject
from celery.worker.consumer import Consumer
from sqlalchemy import select, update
from sqlalchemy.exc import InterfaceError, OperationalError

from megaflow.contract import HopResult, failure
from megaflow.db.engine import session_scope
from megaflow.db.models import Delivery, utcnow
from megaflow.db.sql import insert_ignore
from megaflow.db.states import ExitStatus

log = logging.getLogger(__name__)

#: Executions past the limit that an episode's task still gets to end the episode cleanly.
ENDING_GRACE = 3
_HOP_PREFIX = "megaflow.hop."
_EPISODE = "megaflow.episode"


def delivery_key(name: str, task_id: str, args, kwargs) -> str:
    """One message's identity: a continuation reuses its task id, so the arguments count too."""
    blob = json.dumps([name, task_id, args, kwargs], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:64]


def count_delivery(db_url: str, name: str, task_id: str, args, kwargs) -> int:
    """Count one more execution of a redelivered message; returns the count so far."""
    key = delivery_key(name, task_id, args, kwargs)
    with session_scope(db_url) as s:
        row = {"key": key, "task_name": name[:100], "task_id": (task_id or "")[:64], "count": 1,
               "first_at": utcnow(), "last_at": utcnow()}
        if s.execute(insert_ignore(s.connection(), Delivery.__table__, row)).rowcount == 1:
            return 1
        s.execute(update(Delivery).where(Delivery.key == key).values(count=Delivery.count + 1, last_at=utcnow()))
        return int(s.execute(select(Delivery.count).where(Delivery.key == key)).scalar())


def poison_result(hop: str, step, count: int, what: str | None = None) -> dict:
    """What a poisoned hop hands the episode's decision: an infra failure naming the hop.

    Args:
        hop: The hop whose result this stands for (for a decision: the hop it follows).
        step: Its step.
        count: Deliveries so far.
        what: What was poisoned, for the error text; default ``<hop> hop``.
    """
    try:
        step = int(step or 0)
    except (TypeError, ValueError):
        step = 0
    what = what or f"{hop} hop"
    return failure(hop, step, f"{what} (step {step}) delivered {count} times without finishing: given up (poison)",
                   ExitStatus.POISON).wire()


class MegaFlowTask(Task):
    """The base of every MegaFlow task: counts redeliveries and stops poison messages.

    Only messages RabbitMQ flags ``redelivered`` (their previous delivery was never
    acknowledged) are counted, so a healthy run writes nothing here.
    """

    def __call__(self, *args, **kwargs):
        request = self.request
        if request.called_directly:
            return super().__call__(*args, **kwargs)
        if (request.delivery_info or {}).get("redelivered"):
            settings = getattr(self.app, "megaflow_settings", None)
            if settings is not None:
                try:
                    count = count_delivery(settings.resolved_database_url(), self.name, request.id, args, kwargs)
                except (OperationalError, InterfaceError):
                    # The database is down (a restart): the task's own retries handle that;
                    # failing here would dead-letter a healthy message.
                    log.warning("could not count a redelivery of %s[%s]; running it", self.name, request.id)
                    count = 0
                limit = settings.hop_max_deliveries
                # The first delivery is never counted: this one is delivery count + 1.
                if count and count + 1 > limit:
                    return self._poisoned(count + 1, limit, args, kwargs)
        return self.run(*args, **kwargs)

    def on_replace(self, sig):
        """`Task.replace` without its closing `Ignore`.

        Celery formats a full traceback for every Ignore: starting a group cost twice
        what it does without. As `megaflow.hops.episode.continue_with` does, the task
        returns normally instead, once what `replace` moved onto the replacement (its
        chord membership, chain and callbacks) is taken off this delivery, so its
        success neither counts as the chord member's end nor runs them twice.
        """
        if self.request.is_eager:
            return super().on_replace(sig)
        sig.delay()
        req = self.request
        req.chord = req.chain = req.callbacks = req.errbacks = None
        return None

    def _poisoned(self, count: int, limit: int, args, kwargs):
        ending = self.name == _EPISODE or self.name.startswith(_HOP_PREFIX)
        log.error("task %s[%s] delivered %d times (limit %d): %s", self.name, self.request.id, count, limit,
                  "ending its episode as infra_failed" if ending and count <= limit + ENDING_GRACE
                  else "dead-lettered")
        self._event(count, args)
        if not ending or count > limit + ENDING_GRACE:
            raise Reject(f"poison: delivered {count} times", requeue=False)
        if self.name == _EPISODE:
            prev, episode_id = (list(args) + [None, None])[:2]
            prev = HopResult.received(prev)
            return self.run(poison_result(prev.hop, prev.step, count, what=f"decision after the {prev.hop} hop"),
                            episode_id, **kwargs)
        hop = self.name.removeprefix(_HOP_PREFIX)
        step = args[1] if len(args) > 1 else kwargs.get("step", 0)
        episode_id = args[0] if args else kwargs.get("episode_id")
        result = poison_result(hop, step, count)
        return self._record_poison(episode_id, hop, result)

    def _record_poison(self, episode_id, hop: str, result: dict) -> dict:
        """Record a poisoned hop's result in the ledger; returns what the ledger holds.

        A redelivery after this one (or a duplicate lineage) then replays the poison
        result instead of running the hop; a result an earlier delivery did record
        (it died before its acknowledgement) is kept and handed on instead. Best
        effort: the database being down must not turn the poison path into a loss.
        """
        from megaflow.db import ledger

        if not isinstance(episode_id, str):
            return result
        key = (episode_id, HopResult.received(result).step, hop)
        try:
            with session_scope(self.app.megaflow_settings.resolved_database_url()) as s:
                done = ledger.recorded(s, *key)
                if done is not None:
                    return done
                if not ledger.finish(s, *key, result) and not ledger.record(s, *key, self.request.id, result):
                    s.rollback()
                    return ledger.recorded(s, *key) or result
        except (OperationalError, InterfaceError):
            log.warning("could not record the poison result of %s %s", hop, key, exc_info=True)
        return result

    def _event(self, count: int, args) -> None:
        from megaflow.events import emit

        subject = next((a for a in args if isinstance(a, str)), None)
        try:
            with session_scope(self.app.megaflow_settings.resolved_database_url()) as s:
                emit(s, "task.poison", subject_id=(subject or "")[:32] or None,
                     data={"task": self.name, "task_id": self.request.id, "deliveries": count})
        except Exception:  # the event is a courtesy; the decision above stands without it
            log.warning("could not record the task.poison event", exc_info=True)


class DeadLetteringConsumer(Consumer):
    """Celery's consumer, but a message it cannot decode is dead-lettered, not acknowledged away."""

    def on_decode_error(self, message, exc):
        log.error("undecodable message (content type %r, %d bytes) dead-lettered to megaflow.dead: %s",
                  message.content_type, len(message.body or b""), exc)
        message.reject_log_error(log, self.connection_errors, requeue=False)
