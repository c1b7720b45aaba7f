"""Tiny tasks the benchmarks time. Registered on every app; they touch nothing else."""

from __future__ import annotations

import time

from megaflow.events import emit
from megaflow.runtime import get_runtime


def noop_task(*args, **kwargs):
    """Does nothing: the raw-Celery floor the pipeline is compared with."""
    return


def relay_task(self, remaining: int, queue: str):
    """Does nothing but enqueue its successor: the floor of any task that hands work on.

    Every pipeline hop publishes the next one (with the app's publisher confirms),
    which a no-op task never does; a chain of these measures that floor.
    """
    if remaining > 0:
        self.apply_async((remaining - 1, queue), queue=queue, exchange="megaflow", routing_key=queue)


def chord_member_task():
    """Returns when it finished, so the body can time the chord's close."""
    return time.time()


def chord_body_task(self, results, key: str):
    """Records how long after the last member finished this body started."""
    close_s = time.time() - max(results)
    with get_runtime(self.app).session() as s:
        emit(s, "bench.chord", subject_id=key, data={"close_s": close_s, "members": len(results)})
    return close_s
