"""Distributed semaphores under many racing processes on the real PostgreSQL."""

from __future__ import annotations

import multiprocessing as mp
import random
import time

from megaflow.db.engine import session_scope
from megaflow.db.schema import upgrade
from megaflow.scheduler import semaphores

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
