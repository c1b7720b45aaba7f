"""Deliver a hop's message later without holding a worker: broker-side delay queues.

On RabbitMQ the message goes to a TTL queue that dead-letters into the hop's own
queue when the time is up (`queues.topology.delay_queue`). Celery's own countdown
would keep every waiting message in a worker's memory, unacknowledged, up to the
broker's consumer timeout; 10,000 simulated 30-second calls would sit in one
process. Other transports (the embedded SQLite one) have no TTL: they use countdown.
"""

from __future__ import annotations

import threading

from queues import topology

_declared: set[str] = set()
_lock = threading.Lock()


def delayed_options(app, target: str, delay_s: float) -> dict:
    """`apply_async` options that deliver into queue `target` after `delay_s` seconds."""
    if delay_s <= 0:
        return {}
    if app.conf.broker_url is None or not str(app.conf.broker_url).startswith(("amqp", "pyamqp")):
        return {"countdown": delay_s}
    queue = topology.delay_queue(target, delay_s)
    with _lock:
        if queue.name not in _declared:
            with app.connection_for_write() as conn:
                queue(conn.default_channel).declare()
            _declared.add(queue.name)
    return {"queue": queue.name, "exchange": topology.EXCHANGE.name, "routing_key": queue.name}
