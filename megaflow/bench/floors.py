"""Floors measured in the same run as a benchmark: raw AMQP and raw Celery no-op tasks."""

from __future__ import annotations

import socket
import time
import uuid

from megaflow.local_stack import WorkerProcess, agent_processes


def raw_amqp_msgs_per_s(broker_url: str, n: int = 20_000) -> float:
    """Persistent messages through one RabbitMQ queue via pika: publish all, then consume all."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(pika_url(broker_url)))
    ch = conn.channel()
    queue = f"megaflow.bench.raw.{uuid.uuid4().hex[:8]}"
    ch.queue_declare(queue, durable=True, auto_delete=False)
    body = b'{"episode_id": "0123456789abcdef0123456789abcdef", "step": 1}'
    props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    t0 = time.perf_counter()
    for _ in range(n):
        ch.basic_publish("", queue, body, props)
    ch.basic_qos(prefetch_count=1000)
    got = 0
    for method, _, _ in ch.consume(queue, inactivity_timeout=10):
        if method is None:
            break
        got += 1
        if got % 500 == 0 or got == n:
            ch.basic_ack(method.delivery_tag, multiple=True)
        if got == n:
            break
    elapsed = time.perf_counter() - t0
    ch.cancel()
    ch.queue_delete(queue)
    conn.close()
    return got / elapsed


def pika_url(kombu_url: str) -> str:
    """kombu writes the default vhost as a trailing '//'; pika wants it %2F-quoted."""
    from urllib.parse import quote

    scheme, rest = kombu_url.split("://", 1)
    hostpart, _, vhost = rest.partition("/")
    return f"{scheme}://{hostpart}/{quote(vhost or '/', safe='')}"


def celery_noop_tasks_per_s(app, settings, n: int = 5_000) -> float:
    """No-op tasks through the agent pool's worker configuration on the same broker."""
    return _timed_on_private_worker(app, settings, "noop", n, lambda sig_of, producer: [
        sig_of("megaflow.noop").apply_async(producer=producer) for _ in range(n)])


def celery_relay_tasks_per_s(app, settings, n: int = 5_000, chains: int = 64) -> float:
    """Tasks that each only enqueue their successor (`chains` chains in flight), same worker configuration.

    The pipeline's shape without its work: every hop publishes the next one.
    """
    length = n // chains
    return _timed_on_private_worker(app, settings, "relay", chains * length, lambda sig_of, producer: [
        sig_of("megaflow.bench.relay", length - 1).apply_async(producer=producer) for _ in range(chains)])


def _timed_on_private_worker(app, settings, kind: str, n: int, send, timeout_s: float = 600.0) -> float:
    """Tasks per second of `n` tasks that `send` starts, run by agent-pool workers of their own
    (as many processes as the pipeline's agent pool)."""
    # A private queue: leftovers on the shared queues must not count, nor be eaten.
    queue = f"megaflow.bench.{kind}.{uuid.uuid4().hex[:8]}"
    workers = [WorkerProcess("agent", settings, name=f"{kind}-{i}-{uuid.uuid4().hex[:6]}",
                             extra_env={"MEGAFLOW_WORKER_QUEUES": queue}).start()
               for i in range(agent_processes(settings))]

    def sig_of(name: str, *args):
        return app.signature(name, args=(*args, queue) if args else (), queue=queue, exchange="megaflow",
                             routing_key=queue)

    def done() -> int:
        return tasks_done(app, *(w.name for w in workers))

    try:
        for w in workers:
            wait_for_worker(app, w.name)
        before = done()
        t0 = time.perf_counter()
        with app.producer_or_acquire() as producer:
            send(sig_of, producer)
        while done() - before < n:
            if time.perf_counter() - t0 > timeout_s:
                raise TimeoutError(f"{kind} floor: {n} tasks not done in {timeout_s:g}s")
            time.sleep(0.05)
        return n / (time.perf_counter() - t0)
    finally:
        for w in workers:
            w.stop()
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)


def wait_for_worker(app, name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = app.control.ping(timeout=0.5) or []
        if any(name in list(r)[0] for r in replies):
            return
    raise TimeoutError(f"worker {name} did not answer a ping in {timeout}s")


def tasks_done(app, *names: str) -> int:
    """Tasks the named workers (of this machine) have finished, summed.

    Asked of those workers only, returning once they all answered: a broadcast
    waits out its whole timeout, which would count in the floor's time.
    """
    host = socket.gethostname()
    stats = app.control.inspect(timeout=0.5, destination=[f"{n}@{host}" for n in names], limit=len(names)).stats() or {}
    return sum(sum(st.get("total", {}).values()) for node, st in stats.items()
               if any(node.startswith(name + "@") for name in names))
