"""Prometheus metrics read on each scrape from the state database and the broker.

Nothing is counted in the workers: the state database already records every
episode, sandbox and hop, and the broker knows its queues, so a scrape asks
both. A database or broker that does not answer is reported as
``megaflow_up{component=...} 0`` instead of failing the whole scrape.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from megaflow.config import Settings
from megaflow.db.models import utcnow
from megaflow.ops import stats
from megaflow.scheduler.scale import queue_depths
from queues import topology

log = logging.getLogger(__name__)

#: Hop latency buckets (s): decisions take milliseconds, model calls and commands up to minutes.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class MegaFlowCollector(Collector):
    """Collects MegaFlow's gauges and histograms at scrape time.

    Args:
        settings: where the state database and the broker are.
        hop_window_s: histograms cover hops finished this many seconds before the scrape.
        token_window_s: tokens/s is averaged over this many seconds.
        queues: queues to measure besides the pools', the dead-letter queue and
            every known ``env.<host>``.
    """

    def __init__(self, settings: Settings, hop_window_s: float = 300.0, token_window_s: float = 60.0,
                 queues: Sequence[str] = (), buckets: Sequence[float] = BUCKETS):
        self.settings = settings
        self.hop_window_s = hop_window_s
        self.token_window_s = token_window_s
        self.extra_queues = list(queues)
        self.buckets = list(buckets)
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
            since = utcnow() - dt.timedelta(seconds=self.hop_window_s)
            durations = stats.hop_histograms(s, since, self.buckets)
            prompt, completion = stats.recent_tokens(s, self.token_window_s)

        g = GaugeMetricFamily("megaflow_episodes", "Episodes by state (all runs).", labels=["state"])
        for state in (*stats.STATE_ORDER, *sorted(set(episodes) - set(stats.STATE_ORDER))):
            g.add_metric([state], episodes.get(state, 0))
        yield g
        g = GaugeMetricFamily("megaflow_runs", "Runs by status.", labels=["status"])
        for status, n in sorted(runs.items()):
            g.add_metric([status], n)
        yield g
        g = GaugeMetricFamily("megaflow_sandboxes", "Sandboxes by host and state.", labels=["host", "state"])
        for (host, state), n in sorted(sandboxes.items()):
            g.add_metric([host, state], n)
        yield g
        window = f"hops finished in the last {self.hop_window_s:g} s"
        yield self._histogram("megaflow_hop_duration_seconds", f"Work time per hop, {window}.", durations)
        g = GaugeMetricFamily("megaflow_model_tokens_per_second",
                              f"Model tokens per second over the last {self.token_window_s:g} s.", labels=["kind"])
        g.add_metric(["completion"], completion / self.token_window_s)
        g.add_metric(["prompt"], prompt / self.token_window_s)
        yield g

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
        for reason, n in sorted(out["waiting"].items(), key=lambda kv: str(kv[0])):
            g.add_metric([str(reason)], n)
        yield g

    def _histogram(self, name: str, doc: str, data: dict[str, tuple[list[int], int, float]]) -> Metric:
        h = HistogramMetricFamily(name, doc, labels=["hop"])
        for hop, (cumulative, count, total) in sorted(data.items()):
            buckets = [(_le(b), c) for b, c in zip(self.buckets, cumulative)] + [("+Inf", count)]
            h.add_metric([hop], buckets, sum_value=total)
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
