"""Tier-1 model limits: the bucket arithmetic, each store under racing threads, and the
whole pipeline with several real model workers racing through RabbitMQ and PostgreSQL
against a real HTTP server that measures what reaches it.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

import pytest
from conftest import REDIS_URL, need, port_open
from sqlalchemy import func, select

from megaflow.errors import RateLimitedError
from megaflow.ratelimit.base import Bucket, admit, settle
from megaflow.spec import ModelLimits

# -- arithmetic ----------------------------------------------------------------


def test_bucket_admits_its_capacity_then_asks_to_wait():
    limits = ModelLimits(requests_per_s=2.0, burst_s=2.0)
    bucket = Bucket(requests=4.0, tokens=1.0, updated=100.0)
    for _ in range(4):
        bucket, wait = admit(bucket, limits, 100.0, 0, 0.0)
        assert wait == 0.0
    bucket, wait = admit(bucket, limits, 100.0, 0, 0.0)
    assert wait == pytest.approx(0.5)
    bucket, wait = admit(bucket, limits, 100.5, 0, 0.0)
    assert wait == 0.0


def test_tokens_are_reserved_then_settled_to_real_usage():
    limits = ModelLimits(tokens_per_s=100.0)
    bucket, wait = admit(Bucket(requests=1, tokens=100.0, updated=0.0), limits, 0.0, 0, 80.0)
    assert wait == 0 and bucket.tokens == pytest.approx(20.0)
    _, wait = admit(bucket, limits, 0.0, 0, 80.0)
    assert wait == pytest.approx(0.6)
    bucket = settle(bucket, limits, 0.0, reserved=80.0, used=30.0, duration_s=2.0)
    assert bucket.tokens == pytest.approx(70.0)
    assert bucket.latency_s == pytest.approx(1.2)


def test_full_slots_ask_for_a_short_wait():
    limits = ModelLimits(max_in_flight=2)
    _, wait = admit(Bucket(requests=1, tokens=1, updated=0, latency_s=0.4), limits, 0.0, 2, 0.0)
    assert wait == pytest.approx(0.2)


def test_limits_need_at_least_one_limit():
    with pytest.raises(ValueError, match="at least one"):
        ModelLimits(burst_s=3)


# -- stores ----------------------------------------------------------------------


#: PostgreSQL and Redis are real services: their cases are integration tests.
@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration),
                        pytest.param("redis", marks=pytest.mark.integration)])
def limiter(request, tmp_path):
    if request.param == "sqlite":
        from megaflow.db.schema import upgrade
        from megaflow.ratelimit.sql import SQLLimiter

        url = f"sqlite:///{tmp_path / 'state.sqlite'}"
        upgrade(url)
        yield SQLLimiter(url)
    elif request.param == "postgresql":
        from megaflow.db.schema import upgrade
        from megaflow.ratelimit.sql import SQLLimiter

        url = request.getfixturevalue("pg_url")
        upgrade(url)
        yield SQLLimiter(url)
    else:
        need("Redis", port_open("127.0.0.1", 6379))
        from megaflow.ratelimit.redis_store import RedisLimiter

        lim = RedisLimiter(REDIS_URL)
        yield lim
        lim.close()


def _race(limiter, limits: ModelLimits, threads: int, calls: int, call_s: float) -> tuple[int, list[float]]:
    """`threads` threads make `calls` calls in all; returns the peak in flight and the start times."""
    key = f"run:{uuid.uuid4().hex}"
    lock = threading.Lock()
    state = {"now": 0, "peak": 0, "left": calls}
    starts: list[float] = []

    def worker(n: int) -> None:
        i = 0
        while True:
            with lock:
                if state["left"] == 0:
                    return
                state["left"] -= 1
            holder = f"{n}:{i}"
            i += 1
            while True:
                try:
                    lease = limiter.acquire(key, limits, holder, 10.0)
                    break
                except RateLimitedError as exc:
                    time.sleep(exc.retry_after)
            with lock:
                state["now"] += 1
                state["peak"] = max(state["peak"], state["now"])
                starts.append(time.monotonic())
            time.sleep(call_s)
            with lock:
                state["now"] -= 1
            limiter.release(lease, 10.0)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    assert limiter.in_flight(key) == 0, "every slot released"
    return state["peak"], sorted(starts)


def max_in_window(times: list[float], window: float) -> int:
    """The most events inside any interval `window` long."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] > window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def test_store_caps_calls_in_flight(limiter):
    peak, starts = _race(limiter, ModelLimits(max_in_flight=3), threads=8, calls=24, call_s=0.05)
    assert len(starts) == 24 and peak == 3


def test_store_caps_request_rate(limiter):
    limits = ModelLimits(requests_per_s=20.0, burst_s=0.25)
    _, starts = _race(limiter, limits, threads=6, calls=30, call_s=0.0)
    assert len(starts) == 30
    # At most the bucket (5) plus the rate over any second; and the limit did bite.
    assert max_in_window(starts, 1.0) <= 5 + 20 + 1
    assert starts[-1] - starts[0] >= (30 - 5) / 20.0 * 0.9


def test_lease_frees_the_slot_of_a_dead_caller(limiter):
    key = f"run:{uuid.uuid4().hex}"
    limits = ModelLimits(max_in_flight=1, lease_s=0.3)
    limiter.acquire(key, limits, "dies", 1.0)  # never released: its worker was killed
    with pytest.raises(RateLimitedError):
        limiter.acquire(key, limits, "next", 1.0)
    # The dead hop's redelivery takes its own slot over at once.
    limiter.release(limiter.acquire(key, limits, "dies", 1.0), 1.0)
    limiter.acquire(key, limits, "dies-again", 1.0)
    time.sleep(0.4)
    limiter.release(limiter.acquire(key, limits, "next", 1.0), 1.0)


# -- through the pipeline ----------------------------------------------------------


class CountingServer:
    """An OpenAI-compatible HTTP server that answers slowly and records what reaches it.

    Replies like the scripted fake: one command per turn, then `submit`.
    """

    def __init__(self, latency_s: float, commands: int = 2):
        self.latency_s, self.commands = latency_s, commands
        self.lock = threading.Lock()
        self.now = self.peak = 0
        self.calls: list[tuple[float, int]] = []  # (arrival, tokens charged)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def _handler(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                turn = sum(1 for m in body["messages"] if m["role"] == "assistant")
                with outer.lock:
                    outer.now += 1
                    outer.peak = max(outer.peak, outer.now)
                    outer.calls.append((time.monotonic(), 60))
                time.sleep(outer.latency_s)
                with outer.lock:
                    outer.now -= 1
                text = "```bash\nsubmit\n```" if turn >= outer.commands else f"```bash\necho {turn}\n```"
                data = json.dumps({"model": "counting", "choices": [{"message": {"content": text},
                                   "finish_reason": "stop"}], "usage": {"prompt_tokens": 50, "completion_tokens": 10}})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data.encode())

        return Handler

    def __enter__(self) -> Self:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def racing_cluster(make_cluster):
    """Three model workers (8 threads each), one agent and one env worker."""
    from megaflow.bench.floors import wait_for_worker

    cluster = make_cluster("rl-host", pools=())
    threads = {"MEGAFLOW_WORKER_CONCURRENCY": "8"}
    for i in range(3):
        cluster.start("model", name=f"model{i}", env=threads, key=f"model{i}")
    for pool in ("agent", "env"):
        cluster.start(pool)
    for w in cluster.workers.values():
        wait_for_worker(cluster.client.app, w.name)
    return cluster.client

def _spec(url: str, episodes: int, limits: dict) -> dict:
    return {
        "name": "rate-limited",
        "rollouts": episodes,
        "model": {"type": "openai", "model": "counting", "endpoints": [url], "max_retries": 0,
                  "sampling": {"max_tokens": 16}},
        "model_limits": limits,
        "sandbox": {"type": "memory"},
        "tasks": [{"instance_id": "t", "instruction": "echo twice", "check": "true"}],
    }


def _assert_all_done(client, run_id: str, episodes: int) -> None:
    from megaflow.ratelimit.sql import ModelSlot

    st = client.wait(run_id, timeout=120)
    assert st["by_state"] == {"succeeded": episodes}, st
    with client.session() as s:
        assert s.execute(select(func.count()).select_from(ModelSlot)).scalar() == 0, "a slot leaked"


@pytest.mark.integration
def test_workers_racing_keep_the_limits(racing_cluster):
    """Three model workers, 24 threads: calls in flight, requests/s, then tokens/s hold."""
    client = racing_cluster
    limits = {"max_in_flight": 3, "requests_per_s": 6.0, "burst_s": 1.0}
    with CountingServer(latency_s=0.5) as server:
        run_id = client.submit(_spec(server.url, 12, limits))
        _assert_all_done(client, run_id, 12)
    arrivals = sorted(t for t, _ in server.calls)
    assert len(arrivals) == 36
    assert server.peak == 3, f"peak of {server.peak} calls in flight for a limit of 3"
    # Any one-second window: the bucket (6) plus 6/s, with slack for the way from admission to the server.
    assert max_in_window(arrivals, 1.0) <= 6 + 6 + 2, arrivals
    rate = (36 - 6) / (arrivals[-1] - arrivals[0])
    assert rate <= 6.0 * 1.1, f"achieved {rate:.2f} requests/s for a limit of 6"

    # 60 tokens a call and 240 tokens/s: four calls a second.
    with CountingServer(latency_s=0.05) as server:
        run_id = client.submit(_spec(server.url, 8, {"tokens_per_s": 240.0, "burst_s": 1.0}))
        _assert_all_done(client, run_id, 8)
    arrivals = sorted(t for t, _ in server.calls)
    assert len(arrivals) == 24
    rate = (sum(n for _, n in server.calls) - 240) / (arrivals[-1] - arrivals[0])
    assert rate <= 240 * 1.1, f"achieved {rate:.0f} tokens/s for a limit of 240"
    assert max_in_window(arrivals, 1.0) * 60 <= 240 + 240 + 60
