"""Queue wait: how long a hop's message waited between its publish and the start of its hop.

The publishing process stamps its wall clock into a message header (`stamp`, a
Celery ``before_task_publish`` handler that `megaflow.app.make_app` connects), so
every message carries it: a hop's continuation (``routing.continue_with``), a
start message re-sent on admission, a retry. The worker reads it from
``task.request`` when the hop starts (`queue_wait`) and the ledger keeps it
beside the work time (``hops.queued_s``).

Publisher and worker may be different hosts, so the figure includes their clock
skew: a worker whose clock is behind the publisher's would read a negative wait,
which is clamped to 0. NTP-synchronised hosts differ by milliseconds. A message
with a countdown or ETA waits from its due time, not from its publish. A
redelivered message keeps its first stamp: its wait includes the delivery that
did not finish.
"""

from __future__ import annotations

import datetime as dt
import time

#: The message header holding the publisher's wall clock (Unix seconds).
HEADER = "megaflow_published_at"


def stamp(sender=None, headers: dict | None = None, **_) -> None:
    """``before_task_publish`` handler: stamp the publish time into the message's headers."""
    if headers is not None:
        headers[HEADER] = time.time()


def queue_wait(request, now: float | None = None) -> float | None:
    """Seconds the task behind `request` waited in its queue; None when its message had no stamp.

    Args:
        request: a Celery ``task.request`` (custom headers are its attributes).
        now: the start time (Unix seconds); the current time when omitted.
    """
    try:
        published = float(getattr(request, HEADER, None))
    except (TypeError, ValueError):  # no stamp (a direct call, an older publisher) or a mangled one
        return None
    due = _eta(getattr(request, "eta", None))
    if due is not None:
        published = max(published, due)
    return max(0.0, (time.time() if now is None else now) - published)


def _eta(eta) -> float | None:
    if not eta:
        return None
    try:
        when = eta if isinstance(eta, dt.datetime) else dt.datetime.fromisoformat(str(eta))
    except ValueError:
        return None
    if when.tzinfo is None:  # Celery writes UTC
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()
