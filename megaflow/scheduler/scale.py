"""The elasticity signal: backlog per queue and recommended workers per pool.

By Little's law a pool needs (work arriving per second × seconds per task) task
slots to keep up, plus enough to drain its backlog within `drain_s`. Work per
second comes from the hops ledger (hops finished in the last `window_s`), backlog
from the broker's queue depths. The same law applied to the queue wait the ledger
records (``hops.queued_s``, publish to start) gives the messages that waited on
average over the window (`queued` = hops/s × mean wait): a backlog that is not
a passing burst shows there too, and the wait is what a hop's caller felt. Env hosts are counted in sandboxes: the episodes
holding one plus those waiting for capacity, over the capacity of a host.
An autoscaler (KEDA's Prometheus or exec scaler, a cron script) reads
`megaflow scale --json` or the `megaflow_recommended_workers` metric.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from megaflow.config import Settings
from megaflow.db import states
from megaflow.db.models import Episode, Hop, utcnow
from megaflow.scheduler import admission, hosts
from queues import topology
from queues.topology import POOL_DEFAULTS

#: Hop names in the ledger -> the pool that runs them.
HOP_POOLS = {"generate": topology.MODEL, "provision": topology.ENV, "exec": topology.ENV,
             "evaluate": topology.ENV, "release": topology.ENV}


def pool_of(hop: str) -> str:
    return HOP_POOLS.get(hop, topology.AGENT)


def busy_seconds(s: Session, window_s: float) -> dict[str, tuple[int, float, int, float]]:
    """{pool: (hops finished, seconds of work, hops with a queue wait, seconds queued)} over the last `window_s`."""
    since = utcnow() - dt.timedelta(seconds=window_s)
    out: dict[str, list] = {p: [0, 0.0, 0, 0.0] for p in topology.POOLS}
    rows = s.execute(select(Hop.hop, func.count(), func.coalesce(func.sum(Hop.duration_s), 0.0),
                            func.count(Hop.queued_s), func.coalesce(func.sum(Hop.queued_s), 0.0))
                     .where(Hop.finished_at >= since).group_by(Hop.hop)).all()
    for hop, n, secs, n_queued, queued in rows:
        pool = out[pool_of(hop)]
        pool[0] += n
        pool[1] += float(secs)
        pool[2] += n_queued
        pool[3] += float(queued)
    return {p: tuple(v) for p, v in out.items()}


def report(settings: Settings, app=None, window_s: float = 120.0, drain_s: float = 60.0,
           slots: dict[str, int] | None = None) -> dict:
    """Backlog and recommended worker counts (see the module doc)."""
    from megaflow.db.engine import session_scope

    slots = slots or {p: c for p, (_, c) in POOL_DEFAULTS.items()}
    with session_scope(settings.resolved_database_url()) as s:
        live = hosts.live_hosts(s, settings.host_dead_after_s)
        busy = busy_seconds(s, window_s)
        waiting = dict(s.execute(select(Episode.wait_reason, func.count())
                                 .where(Episode.state == states.WAITING).group_by(Episode.wait_reason)).all())
        active = s.execute(select(func.count()).where(Episode.state.in_(
            (states.PROVISIONING, states.RUNNING, states.EVALUATING)))).scalar() or 0
    names = [*topology.POOLS, *(topology.env_host_queue(h["name"]).name for h in live)]
    queues = {}
    if app is not None:
        queues = {q: {"messages": m, "consumers": c} for q, (m, c) in queue_depths(app, names).items()}
    pools = {}
    for pool in topology.POOLS:
        n, secs, n_queued, queued = busy[pool]
        per_task = secs / n if n else 0.0
        # Hops recorded without a publish stamp have no wait: the mean is over those with one.
        wait = queued / n_queued if n_queued else 0.0
        backlog = sum(v["messages"] for q, v in queues.items() if q == pool or q.startswith(pool + "."))
        consumers = queues.get(pool, {}).get("consumers", 0)
        need = secs / window_s + backlog * per_task / drain_s
        pools[pool] = {"hops_per_s": round(n / window_s, 3), "seconds_per_hop": round(per_task, 4),
                       "queued_s_per_hop": round(wait, 4), "queued": round(n / window_s * wait, 2),
                       "backlog": backlog, "workers": consumers,
                       "recommended": max(1, math.ceil(need / max(1, slots.get(pool, 1))))}
    capacity_waiters = sum(n for why, n in waiting.items() if (why or "").startswith(admission.CAPACITY))
    per_host = max((h["capacity"] for h in live), default=settings.sandbox_capacity)
    in_use = sum(h["used"] for h in live)
    pools[topology.ENV]["hosts"] = len(live)
    pools[topology.ENV]["recommended_hosts"] = max(1, math.ceil((in_use + capacity_waiters) / max(1, per_host)))
    return {"window_s": window_s, "queues": queues, "episodes_active": active, "waiting": waiting,
            "hosts": live, "pools": pools}


def queue_depths(app, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``{queue: (messages, consumers)}`` by a passive declare of each queue.

    A passive declare reads a queue without creating it; a queue that does not
    exist (an env host whose worker never started) is left out.

    Raises:
        kombu / amqp connection errors: the broker did not answer.
    """
    from amqp.exceptions import NotFound
    from kombu.exceptions import ChannelError

    out: dict[str, tuple[int, int]] = {}
    with app.connection_for_read() as conn:
        conn.connect()
        for name in names:
            # A failed passive declare closes its channel (AMQP 404): one channel per queue.
            channel = conn.channel()
            try:
                ok = channel.queue_declare(queue=name, passive=True)
                out[name] = (int(ok.message_count), int(ok.consumer_count))
            except (NotFound, ChannelError):  # RabbitMQ's 404; kombu's virtual transports' own
                continue
            finally:
                channel.close()  # a no-op on a channel the broker closed after its 404
    return out
