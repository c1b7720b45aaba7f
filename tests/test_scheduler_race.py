"""Distributed semaphores under many racing processes on the real PostgreSQL."""

from __future__ import annotations

import multiprocessing as mp
import random
import time

import pytest

from megaflow.db.engine import session_scope
from megaflow.db.schema import upgrade
from megaflow.scheduler import semaphores

pytestmark = pytest.mark.integration

LIMIT = 3
WORKERS = 8
ROUNDS = 25


def _contend(url: str, wid: int, inside, peak, lock, took) -> None:
    rng = random.Random(wid)
    for i in range(ROUNDS):
        holder = f"w{wid}-{i}"
        with session_scope(url) as s:
            got = semaphores.acquire(s, ["host:h", "image:i"], holder) is None
        if not got:
            time.sleep(rng.random() * 0.01)
            continue
        with lock:
            inside.value += 1
            peak.value = max(peak.value, inside.value)
            took.value += 1
        time.sleep(rng.random() * 0.02)
        with lock:
            inside.value -= 1
        with session_scope(url) as s:
            semaphores.release_all(s, holder)


def test_many_processes_never_exceed_the_limit(pg_url):
    upgrade(pg_url)
    with session_scope(pg_url) as s:
        semaphores.set_limit(s, "host:h", LIMIT)
    ctx = mp.get_context("spawn")
    inside, peak, took = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Value("i", 0)
    lock = ctx.Lock()
    procs = [ctx.Process(target=_contend, args=(pg_url, w, inside, peak, lock, took)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert 1 <= peak.value <= LIMIT, f"{peak.value} holders at once, limit {LIMIT}"
    assert took.value > LIMIT * 3, "the racers made little progress"
    with session_scope(pg_url) as s:
        use = semaphores.usage(s)
        assert use["host:h"] == (0, LIMIT) and use["image:i"][0] == 0 and use["global"][0] == 0


def test_threads_racing_on_new_keys_never_read_a_semaphore_as_full(pg_url):
    """The agent pool runs decisions in threads: a semaphore row one thread is still
    creating (its transaction open) must not look full to another. That spurious
    capacity wait would hold every later episode back until some episode ends."""
    import threading
    import uuid

    upgrade(pg_url)
    first_in, results = threading.Event(), []

    def racer(i: int) -> None:
        if i:
            first_in.wait(10)
        with session_scope(pg_url) as s:
            # A fresh database: the first acquire creates the rows (global included).
            full = semaphores.acquire(s, ["image:i", f"host:h{i % 2}"], f"t{i}-{uuid.uuid4().hex[:6]}")
            if not i:
                first_in.set()
                time.sleep(0.3)  # its rows are not committed yet: the others race into this
        results.append(full)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [None] * 6, f"unlimited semaphores read as full: {results}"
    with session_scope(pg_url) as s:
        assert semaphores.usage(s)["global"] == (6, None)
