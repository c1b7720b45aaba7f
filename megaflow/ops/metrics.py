"""Prometheus metrics read on each scrape from the state database and the broker.

Nothing is counted in the workers: the state database already records every
episode, sandbox and hop, and the broker knows its queues, so a scrape asks
both. Counters (``_total``) and histograms are cumulative since the beginning of
the database, kept incrementally by `megaflow.ops.counters` so a scrape reads
only the rows that are new; gauges say how things are now. Label values are
bounded (unknown ones read ``other``). A database or broker that does not
answer is reported as ``megaflow_up{component=...} 0`` instead of failing the
whole scrape. docs/deployment.md lists every metric.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from megaflow.config import Settings
from megaflow.ops import stats
from megaflow.ops.counters import Cumulative, Histogram, bounded
from megaflow.scheduler.scale import queue_depths
from queues import topology

log = logging.getLogger(__name__)

#: Hop latency buckets (s): decisions take milliseconds, model calls and commands up to minutes.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RUN_STATUSES = frozenset({"submitted", "running", "finished", "cancelled"})
#: A waiting episode's reason is free text ("capacity: no live env host ..."): its first word is the label.
WAIT_REASONS = frozenset({"capacity", "quota", "image", "host"})


class MegaFlowCollector(Collector):
    """Collects MegaFlow's counters, histograms and gauges at scrape time.

    Args:
        settings: where the state database and the broker are.
        queues: queues to measure besides the pools', the dead-letter queue and
            every known ``env.<host>``.
        buckets: histogram upper bounds in seconds.
        settle_s: how far the counters' high-water mark trails the clock
            (`megaflow.ops.counters`): more than the worst clock skew between hosts.
    """

    def __init__(self, settings: Settings, queues: Sequence[str] = (), buckets: Sequence[float] = BUCKETS,
                 settle_s: float = 30.0):
        self.settings = settings
        self.extra_queues = list(queues)
        self.buckets = list(buckets)
        self.totals = Cumulative(self.buckets, settle_s)
        self._app = None

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("megaflow_up", "1 if the component answered this scrape.", labels=["component"])
        started = time.monotonic()
        hosts: list[str] = []
        try:
            db_metrics = list(self._database(hosts))
            up.add_metric(["database"], 1)
        except Exception as exc:  # the scrape must still answer, with the failure as a value
            log.warning("state database did not answer: %s", exc)
            db_metrics = []
            up.add_metric(["database"], 0)
        yield from db_metrics
        try:
            queue_metrics = list(self._queues(hosts))
            up.add_metric(["broker"], 1)
        except Exception as exc:  # as above: an unreachable broker is a value, not an error page
            log.warning("broker did not answer: %s", exc)
            queue_metrics = []
            up.add_metric(["broker"], 0)
        yield from queue_metrics
        try:
            yield from self._scale()
        except Exception as exc:  # as above
            log.warning("scale signal not computed: %s", exc)
        yield up
        yield GaugeMetricFamily("megaflow_scrape_seconds", "Time this scrape took.",
                                value=time.monotonic() - started)

    # -- state database -------------------------------------------------------------

    def _database(self, hosts: list[str]) -> Iterator[Metric]:
        from megaflow.db.engine import session_scope

        with session_scope(self.settings.resolved_database_url()) as s:
            episodes = stats.episodes_by_state(s)
            runs = stats.runs_by_status(s)
            sandboxes = stats.sandboxes_by_state(s)
            hosts.extend(stats.env_hosts(s))
            totals = self.totals.read(s)

        g = GaugeMetricFamily("megaflow_episodes", "Episodes by state now (all runs).", labels=["state"])
        for state, n in _bounded_counts(episodes, stats.STATE_ORDER).items():
            g.add_metric([state], n)
        yield g
        g = GaugeMetricFamily("megaflow_runs", "Runs by status now.", labels=["status"])
        for status, n in _bounded_counts(runs, sorted(RUN_STATUSES)).items():
            g.add_metric([status], n)
        yield g
        g = GaugeMetricFamily("megaflow_sandboxes", "Sandboxes by host and state now.", labels=["host", "state"])
        for (host, state), n in sorted(sandboxes.items()):
            g.add_metric([host, state], n)
        yield g
        c = CounterMetricFamily("megaflow_hops", "Hops finished, by hop and outcome (its failure's kind, or ok).",
                                labels=["hop", "outcome"])
        for (hop, outcome), n in sorted(totals.hops.items()):
            c.add_metric([hop, outcome], n)
        yield c
        yield self._histogram("megaflow_hop_duration_seconds", "Work time per hop (claim or start to record).",
                              totals.work)
        yield self._histogram("megaflow_hop_queued_seconds", "Queue wait per hop (publish to start; clock skew "
                              "between hosts included, clamped at 0).", totals.queued)
        c = CounterMetricFamily("megaflow_episodes_finished", "Episodes that ended, by state and exit status.",
                                labels=["state", "exit_status"])
        for (state, exit_status), n in sorted(totals.episodes.items()):
            c.add_metric([state, exit_status], n)
        yield c
        c = CounterMetricFamily("megaflow_model_tokens", "Tokens of finished model calls, by kind.", labels=["kind"])
        for kind in ("completion", "prompt"):
            c.add_metric([kind], totals.tokens[kind])
        yield c

    def _scale(self) -> Iterator[Metric]:
        from megaflow.scheduler.scale import report

        out = report(self.settings, self._celery())
        g = GaugeMetricFamily("megaflow_recommended_workers",
                              "Workers a pool needs for its load and backlog (megaflow scale).", labels=["pool"])
        for pool, p in out["pools"].items():
            g.add_metric([pool], p["recommended"])
        g.add_metric(["env_hosts"], out["pools"]["env"]["recommended_hosts"])
        yield g
        g = GaugeMetricFamily("megaflow_waiting_episodes", "Episodes waiting for admission, by reason.",
                              labels=["reason"])
        reasons: dict[str, int] = {}
        for reason, n in out["waiting"].items():
            label = bounded(str(reason or "").split(":")[0].split(" ")[0], WAIT_REASONS)
            reasons[label] = reasons.get(label, 0) + n
        for reason, n in sorted(reasons.items()):
            g.add_metric([reason], n)
        yield g

    def _histogram(self, name: str, doc: str, data: dict[str, Histogram]) -> Metric:
        h = HistogramMetricFamily(name, doc, labels=["hop"])
        for hop, hist in sorted(data.items()):
            if hist.count:  # a hop with no value recorded (queue wait of an unstamped message) has no series
                buckets = [(_le(b), c) for b, c in zip(self.buckets, hist.buckets)] + [("+Inf", hist.count)]
                h.add_metric([hop], buckets, sum_value=hist.total)
        return h

    # -- broker ---------------------------------------------------------------------

    def _queues(self, hosts: Iterable[str]) -> Iterator[Metric]:
        names = [*topology.POOLS, *(f"{topology.ENV}.{h}" for h in hosts), topology.DEAD_QUEUE, *self.extra_queues]
        depths = queue_depths(self._celery(), list(dict.fromkeys(names)))
        messages = GaugeMetricFamily("megaflow_queue_messages", "Messages ready in a queue.", labels=["queue"])
        consumers = GaugeMetricFamily("megaflow_queue_consumers", "Consumers of a queue.", labels=["queue"])
        for name, (n_messages, n_consumers) in depths.items():
            messages.add_metric([name], n_messages)
            consumers.add_metric([name], n_consumers)
        yield messages
        yield consumers

    def _celery(self):
        # One client app per collector, built on first scrape (no work at import or init).
        if self._app is None:
            from megaflow.app import make_app

            self._app = make_app(self.settings)
        return self._app


def _bounded_counts(counts: dict[str, int], known: Sequence[str]) -> dict[str, int]:
    """Every known label value (0 when absent), the rest summed under ``other``."""
    out = {k: 0 for k in known}
    for k, n in counts.items():
        label = bounded(k, frozenset(known))
        out[label] = out.get(label, 0) + n
    return out


def _le(bound: float) -> str:
    return repr(float(bound))


def make_registry(collector: MegaFlowCollector) -> CollectorRegistry:
    """A private registry holding only MegaFlow's collector (no process-wide default)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def serve(collector: MegaFlowCollector, port: int, address: str = "127.0.0.1"):
    """Serve ``/metrics`` in a background thread.

    Returns:
        ``(server, thread)``; ``server.shutdown()`` stops it.
    """
    from prometheus_client import start_http_server

    return start_http_server(port, addr=address, registry=make_registry(collector))
