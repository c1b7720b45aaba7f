"""Deliver a hop's message later without holding a worker: broker-side delay queues.

On RabbitMQ the message goes to a TTL queue that dead-letters into the hop's own
queue when the time is up (`queues.topology.delay_queue`). Celery's own countdown
would keep every waiting message in a worker's memory, unacknowledged, up to the
broker's consumer timeout; 10,000 simulated 30-second calls would sit in one
process. Other transports (the embedded SQLite one) have no TTL: they use countdown.
"""

from __future__ import annotations

import threading
import time

from queues import topology

#: Delay queue name -> when this process last declared it (monotonic seconds).
_declared: dict[str, float] = {}
_lock = threading.Lock()
#: Declare a delay queue again after this fraction of its `x-expires`.
RENEW_FRACTION = 0.25


def delayed_options(app, target: str, delay_s: float) -> dict:
    """`apply_async` options that deliver into queue `target` after `delay_s` seconds."""
    if delay_s <= 0:
        return {}
    if app.conf.broker_url is None or not str(app.conf.broker_url).startswith(("amqp", "pyamqp")):
        return {"countdown": delay_s}
    queue = topology.delay_queue(target, delay_s)
    # A queue with `x-expires` is one kombu declares again on every publish (it
    # cannot cache it): three more round trips per delayed hop, a quarter of an
    # agent worker's time under load. RabbitMQ deletes it when it has no consumer
    # and was not declared for `x-expires` — publishing does not count — so it is
    # declared here now and then instead: the last declaration before the last
    # publish is at most a quarter of `x-expires` old, and the queue outlives that
    # publish by three quarters of it, more than the delay itself (x-expires ≥ 2 ×
    # delay + 60 s), so no message waits in a queue about to go.
    renew_s = queue.queue_arguments["x-expires"] / 1000 * RENEW_FRACTION
    with _lock:
        if time.monotonic() - _declared.get(queue.name, float("-inf")) > renew_s:
            with app.connection_for_write() as conn:
                queue(conn.default_channel).declare()
            _declared[queue.name] = time.monotonic()
    return {"queue": queue.name, "exchange": topology.EXCHANGE.name, "routing_key": queue.name, "declare": []}
