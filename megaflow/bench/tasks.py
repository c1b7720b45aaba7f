"""Tiny tasks the benchmarks time; they touch nothing else.

The library does not know them: every pool's worker registers them (`register`, called by
`workers.common`), so `megaflow bench` can time its floors on the same workers as the pipeline.
"""

from __future__ import annotations

import time

from celery import Celery

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


def register(app: Celery) -> None:
    """Register the benchmarks' tasks on `app` under their stable names."""
    app.task(name="megaflow.noop", shared=False)(noop_task)
    app.task(name="megaflow.bench.relay", bind=True, shared=False)(relay_task)
    # Stock result backends join only stored results, so the bench chord stores them.
    app.task(name="megaflow.bench.member", ignore_result=False, shared=False)(chord_member_task)
    app.task(name="megaflow.bench.body", bind=True, shared=False)(chord_body_task)
