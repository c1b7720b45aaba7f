"""Queue topology: exchanges, queues, routing and dead-lettering.

Durable FIFO queues ``model``, ``agent``, ``env`` and one ``env.<host>`` per
environment host. A message rejected without requeue (unknown task, malformed
body, a hop over its delivery limit) goes to the dead-letter exchange
``megaflow.dlx`` and rests in ``megaflow.dead`` for inspection.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from kombu import Exchange, Queue

EXCHANGE = Exchange("megaflow", type="direct", durable=True)
DLX = Exchange("megaflow.dlx", type="fanout", durable=True)
DEAD_QUEUE = "megaflow.dead"

MODEL, AGENT, ENV = "model", "agent", "env"
POOLS = (MODEL, AGENT, ENV)

#: Pool type and default concurrency per service. Model calls and commands wait
#: on I/O (a server, a sandbox), so threads. Agent decisions are short CPU work
#: between database round trips: threads too — prefork's hand-off of every message
#: and result between parent and child cost more than the decision (the pipeline
#: ran 27 % faster, `megaflow bench pipeline`). One process uses one core at most:
#: scale the agent pool with processes (replicas), as every pool.
POOL_DEFAULTS = {
    MODEL: ("threads", 16),
    AGENT: ("threads", 8),
    ENV: ("threads", 16),
}

#: Which queue each task goes to by default. env.<host> is chosen per message.
TASK_QUEUES = {
    "megaflow.episode": AGENT,
    "megaflow.group.start": AGENT,
    "megaflow.group.done": AGENT,
    "megaflow.run.done": AGENT,
    "megaflow.hop.generate": MODEL,
    "megaflow.hop.provision": ENV,
    "megaflow.hop.exec": ENV,
    "megaflow.hop.evaluate": ENV,
    "megaflow.hop.release": ENV,
    "megaflow.noop": AGENT,
    "megaflow.bench.member": AGENT,
    "megaflow.bench.body": AGENT,
}


#: Delay queues: ``megaflow.delay.<target queue>.<milliseconds>``.
DELAY_PREFIX = "megaflow.delay."


def make_queue(name: str) -> Queue:
    """A durable queue on the main exchange, dead-lettering into megaflow.dlx."""
    if name.startswith(DELAY_PREFIX):
        target, _, ms = name[len(DELAY_PREFIX):].rpartition(".")
        return delay_queue(target, int(ms) / 1000.0)
    return Queue(
        name,
        EXCHANGE,
        routing_key=name,
        durable=True,
        queue_arguments={"x-dead-letter-exchange": DLX.name},
    )


def delay_queue(target: str, delay_s: float) -> Queue:
    """A queue where messages wait `delay_s`, then move to queue `target` (TTL + dead-lettering).

    One queue per delay, so every message in it expires in order (RabbitMQ expires
    only from a queue's head). Unused delay queues delete themselves.
    """
    ms = max(1, int(round(delay_s * 1000)))
    name = f"{DELAY_PREFIX}{target}.{ms}"
    return Queue(name, EXCHANGE, routing_key=name, durable=True, queue_arguments={
        "x-message-ttl": ms, "x-dead-letter-exchange": EXCHANGE.name, "x-dead-letter-routing-key": target,
        "x-expires": max(600_000, 2 * ms + 60_000)})


def env_host_queue(host: str) -> Queue:
    """The queue of one env host: exec/evaluate hops for sandboxes living there."""
    return make_queue(f"{ENV}.{host}")


def dead_letter_queue() -> Queue:
    return Queue(DEAD_QUEUE, DLX, durable=True)


def pool_queues(pool: str, host: str | None = None) -> list[Queue]:
    """The queues a worker of `pool` consumes."""
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; expected one of {', '.join(POOLS)}")
    queues = [make_queue(pool)]
    if pool == ENV and host:
        queues.append(env_host_queue(host))
    return queues


def route_task(name, args, kwargs, options, task=None, **kw):
    """Celery router: every MegaFlow task to its pool's queue."""
    queue = TASK_QUEUES.get(name)
    if queue is None:
        return None
    return {"queue": queue, "exchange": EXCHANGE.name, "routing_key": queue}


#: The vhost of docker/compose.yaml (RABBITMQ_DEFAULT_VHOST), hence of queues/definitions.json.
DEFAULT_VHOST = "megaflow"


def definitions(hosts: Sequence[str] = (), vhost: str = DEFAULT_VHOST) -> dict:
    """RabbitMQ definitions of `vhost` (importable with `rabbitmqctl import_definitions`).

    The vhost itself is listed too, so that an import creates it where it is missing.
    `megaflow queues definitions --vhost NAME` prints this; queues/definitions.json is its
    output for the compose file's vhost.
    """
    names = [*POOLS, *(f"{ENV}.{h}" for h in hosts)]
    queues = [
        {
            "name": n,
            "vhost": vhost,
            "durable": True,
            "auto_delete": False,
            "arguments": {"x-dead-letter-exchange": DLX.name},
        }
        for n in names
    ]
    queues.append({"name": DEAD_QUEUE, "vhost": vhost, "durable": True, "auto_delete": False, "arguments": {}})
    exchanges = [
        {"name": EXCHANGE.name, "vhost": vhost, "type": "direct", "durable": True, "auto_delete": False,
         "internal": False, "arguments": {}},
        {"name": DLX.name, "vhost": vhost, "type": "fanout", "durable": True, "auto_delete": False,
         "internal": False, "arguments": {}},
    ]
    bindings = [
        {"source": EXCHANGE.name, "vhost": vhost, "destination": n, "destination_type": "queue",
         "routing_key": n, "arguments": {}}
        for n in names
    ]
    bindings.append({"source": DLX.name, "vhost": vhost, "destination": DEAD_QUEUE, "destination_type": "queue",
                     "routing_key": "", "arguments": {}})
    return {"vhosts": [{"name": vhost}], "queues": queues, "exchanges": exchanges, "bindings": bindings}


def definitions_json(hosts: Sequence[str] = (), vhost: str = DEFAULT_VHOST) -> str:
    """`definitions` as the text of queues/definitions.json (two-space indent, final newline)."""
    return json.dumps(definitions(hosts, vhost), indent=2) + "\n"
