"""`megaflow bench scale`: many episodes in flight at once (the paper's Figure 3).

Scripted model and in-memory sandboxes, through the configured RabbitMQ and
PostgreSQL, with service latencies simulated on the broker (`RunSpec.simulate`):
each model call and each command is a message that waits in a TTL queue before a
worker takes it, as if the call were in flight at a service. What is measured is
what MegaFlow adds: admission, hops, decisions, chords, the database.

Figures (largest N): episodes in flight, steps/s against Little's law (in flight ÷
simulated step latency), queueing delay each hop adds (p99), worker memory; and the
makespan of N episodes of fixed length for each N, against N = 1.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

from sqlalchemy import func, select

from megaflow.bench.floors import wait_for_worker
from megaflow.client import Client
from megaflow.config import Settings
from megaflow.db import states
from megaflow.db.models import Episode, Hop, Run, Step
from megaflow.db.schema import upgrade
from megaflow.local_stack import WorkerProcess, stack_workers

SIZES = (1, 10, 100, 1000, 10000)
ACTIVE = (states.PROVISIONING, states.RUNNING, states.EVALUATING)


def scale_spec(n: int, steps: int, model_latency_s: float, exec_latency_s: float) -> dict:
    replies = ["```bash\necho {step} >> log\n```"] * steps + ["```bash\nsubmit\n```"]
    rollouts = 8 if n % 8 == 0 else 1
    episode_s = (steps + 1) * model_latency_s + steps * exec_latency_s
    return {
        "name": f"bench-scale-{n}",
        "rollouts": rollouts,
        "model": {"type": "scripted", "replies": replies},
        "sandbox": {"type": "memory"},
        "limits": {"max_steps": steps + 2, "episode_timeout_s": max(3600.0, 20 * episode_s)},
        "simulate": {"model_latency_s": model_latency_s, "exec_latency_s": exec_latency_s},
        "tasks": [{"instance_id": f"s{i}", "instruction": "bench", "check": "true"} for i in range(n // rollouts)],
    }


class Sampler(threading.Thread):
    """Once a second: episodes in flight (state database) and the workers' total RSS."""

    def __init__(self, client: Client, run_id: str, workers: list[WorkerProcess]):
        super().__init__(daemon=True)
        self.client, self.run_id, self.workers = client, run_id, workers
        self.inflight: list[tuple[float, int]] = []
        self.rss_mb: list[float] = []
        self.rss_by_pool: dict[str, float] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(1.0):
            with self.client.session() as s:
                n = s.execute(select(func.count()).select_from(Episode).where(
                    Episode.run_id == self.run_id, Episode.state.in_(ACTIVE))).scalar()
            self.inflight.append((time.time(), n))
            by_pool = workers_rss_by_pool(self.workers)
            self.rss_mb.append(sum(by_pool.values()))
            for pool, mb in by_pool.items():
                self.rss_by_pool[pool] = max(self.rss_by_pool.get(pool, 0.0), mb)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def peak_by_pool(self) -> dict[str, float]:
        """Each pool's peak RSS (MB) over the run, rounded for the figures."""
        return {p: round(mb, 1) for p, mb in sorted(self.rss_by_pool.items())}


def workers_rss_by_pool(workers: list[WorkerProcess]) -> dict[str, float]:
    """Resident memory (MB) of each pool's worker, its child processes included."""
    import psutil

    out: dict[str, float] = {}
    for w in workers:
        try:
            proc = psutil.Process(w.pid)
            rss = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
        except (psutil.Error, TypeError):
            continue
        out[w.pool] = out.get(w.pool, 0.0) + rss / 2**20
    return out


def run_scale_bench(sizes=SIZES, steps: int = 8, model_latency_s: float = 120.0, exec_latency_s: float = 20.0,
                    settings: Settings | None = None, progress=None) -> dict:
    settings = settings or Settings()
    if settings.embedded:
        raise SystemExit("bench scale needs RabbitMQ and PostgreSQL: set MEGAFLOW_BROKER_URL and MEGAFLOW_DATABASE_URL")
    # Runs go in the order given (the largest first gets its figures soonest); the
    # growth is always largest N over smallest N.
    sizes = list(dict.fromkeys(sizes))
    host = f"bench-scale-{uuid.uuid4().hex[:6]}"
    settings = settings.model_copy(update={
        "data_dir": Path(tempfile.mkdtemp(prefix="megaflow-bench-")), "host": host,
        # Capacity >= N: the figure is about orchestration, not about waiting for room.
        "sandbox_capacity": max(sizes) + 64})
    upgrade(settings.resolved_database_url())
    refuse_if_busy(settings)
    workers = [w.start() for w in stack_workers(settings, f"{host}-")]
    client = Client(settings)
    out: dict = {"sizes": sizes, "steps": steps, "model_latency_s": model_latency_s,
                 "exec_latency_s": exec_latency_s, "makespan_s": {}, "worker_rss_mb_by_n": {},
                 "worker_rss_mb_by_pool_by_n": {}}
    try:
        for w in workers:
            wait_for_worker(client.app, w.name)
        time.sleep(2 * settings.heartbeat_s)  # the env host has registered and beats
        for n in sizes:
            run_id, makespan, sampler = one_run(client, workers, n, steps, model_latency_s, exec_latency_s)
            out["makespan_s"][n] = round(makespan, 2)
            out["worker_rss_mb_by_n"][n] = round(max(sampler.rss_mb, default=0.0), 1)
            out["worker_rss_mb_by_pool_by_n"][n] = sampler.peak_by_pool()
            if progress:
                progress(f"N={n}: makespan {makespan:.1f}s, peak in flight "
                         f"{max((c for _, c in sampler.inflight), default=0)}, workers {out['worker_rss_mb_by_n'][n]} MB")
            if n == max(sizes):
                out.update(steady_figures(client, run_id, sampler, model_latency_s, exec_latency_s))
    finally:
        for w in workers:
            w.stop()
    base = out["makespan_s"][min(sizes)]
    out["makespan_growth"] = round(out["makespan_s"][max(sizes)] / base, 3) if base else None
    if base and out.get("peak_hops_per_s"):
        # The least makespan N episodes can have at the hop rate this machine reached.
        floor = base + max(sizes) * out["last_phase_hops"] / out["peak_hops_per_s"]
        out["makespan_floor_s"] = round(floor, 1)
        out["makespan_growth_floor"] = round(floor / base, 3)
    out["episode_latency_s"] = (steps + 1) * model_latency_s + steps * exec_latency_s
    return out


def refuse_if_busy(settings: Settings) -> None:
    """Stop before starting when episodes of other runs are not finished.

    Admission is FIFO across runs: they would be admitted first, and compete for
    the workers and the database, whatever the benchmark then reports.
    """
    from megaflow.db.engine import session_scope

    with session_scope(settings.resolved_database_url()) as s:
        live = s.execute(select(Episode.run_id, func.count()).where(
            Episode.state.not_in(states.TERMINAL), Episode.superseded_by.is_(None)).group_by(Episode.run_id)).all()
    if live:
        runs = ", ".join(f"{run_id} ({n})" for run_id, n in live[:5]) + (" …" if len(live) > 5 else "")
        raise SystemExit(f"bench scale: {sum(n for _, n in live)} episodes of {len(live)} earlier run(s) are not "
                         f"finished in this database: {runs}. They would be admitted first and compete with the "
                         "benchmark: `megaflow cancel RUN_ID` each (with workers up), or use a fresh database.")


def one_run(client, workers, n, steps, model_latency_s, exec_latency_s):
    spec = scale_spec(n, steps, model_latency_s, exec_latency_s)
    t0 = time.time()
    run_id = client.submit(spec)
    sampler = Sampler(client, run_id, workers)
    sampler.start()
    try:
        st = client.wait(run_id, timeout=24 * 3600, poll=1.0)
    finally:
        sampler.stop()
    with client.session() as s:
        finished = s.execute(select(Run.finished_at).where(Run.id == run_id)).scalar()
    ok = st["by_state"].get(states.SUCCEEDED, 0)
    if ok != n:
        raise RuntimeError(f"bench run of {n} episodes ended with {st['by_state']}")
    return run_id, finished.timestamp() - t0, sampler


def steady_figures(client: Client, run_id: str, sampler: Sampler, model_latency_s: float,
                   exec_latency_s: float) -> dict:
    """Steps/s of the N episodes in flight together, and per-hop queueing delay.

    All N episodes start together and take the same turns, so their turns fall in
    step: counting turns in a time window only samples a few synchronized bursts.
    Instead each episode's own rate (turns after its first ÷ the time they took,
    each turn a model call plus a command) is measured, and the rates are summed.
    """
    with client.session() as s:
        ids = select(Episode.id).where(Episode.run_id == run_id)
        step_rows = s.execute(select(Step.episode_id, Step.created_at).where(Step.episode_id.in_(ids))).all()
        hops = s.execute(select(Hop.subject_id, Hop.hop, Hop.finished_at, Hop.duration_s)
                         .where(Hop.subject_id.in_(ids))).all()
    times = defaultdict(list)
    for eid, created in step_rows:
        times[eid].append(created.timestamp())
    rates, firsts, lasts = [], [], []
    for ts in times.values():
        ts.sort()
        firsts.append(ts[0])
        lasts.append(ts[-1])
        if len(ts) > 1 and ts[-1] > ts[0]:
            rates.append((len(ts) - 1) / (ts[-1] - ts[0]))
    start, end = max(firsts), min(lasts)
    inflight = [c for t, c in sampler.inflight if start <= t <= end] or [max(c for _, c in sampler.inflight)]
    mean_inflight = statistics.fmean(inflight)
    steps_per_s = sum(rates)
    step_s = model_latency_s + exec_latency_s
    littles = mean_inflight / step_s if step_s else 0.0
    return {
        "inflight_episodes": max(c for _, c in sampler.inflight),
        "inflight_mean_steady": round(mean_inflight, 1),
        "steady_window_s": round(end - start, 1),
        "steps_per_s": round(steps_per_s, 2),
        "littles_law_steps_per_s": round(littles, 2),
        "ratio_to_littles_law": round(steps_per_s / littles, 3) if littles else None,
        "hop_delay_p99_s": round(hop_delay_p99(hops, model_latency_s, exec_latency_s), 3),
        **throughput_floor_inputs(hops),
        "worker_rss_mb": round(max(sampler.rss_mb, default=0.0), 1),
        "worker_rss_mb_by_pool": sampler.peak_by_pool(),
    }


def throughput_floor_inputs(hops, window_s: float = 10.0) -> dict:
    """The figures behind `makespan_floor_s`: the run's peak hop rate and the hops of an episode's last phase.

    The floor: no episode can begin its last phase (its last model call's hop to
    its end) much before the N = 1 makespan, and the N episodes' last phases —
    `last_phase_hops` each — cannot finish faster than the machine runs hops. So
    N episodes take at least N = 1's makespan + N × last_phase_hops ÷ hop capacity,
    however they are scheduled. The capacity is taken as the most hops finished in
    any `window_s` of this run: a fair measure when the run saturates the machine
    (10,000 episodes do), an underestimate — and no bound — for a light one. A growth
    target below the floor needs cheaper hops or more machines, not a better schedule.
    """
    bins, by_episode = defaultdict(int), defaultdict(list)
    for eid, hop, finished, _duration in hops:
        if finished is not None:
            bins[int(finished.timestamp() // window_s)] += 1
            by_episode[eid].append((finished.timestamp(), hop))
    if not bins:
        return {}
    last_phase = []
    for rows in by_episode.values():
        rows.sort()
        calls = [i for i, (_, hop) in enumerate(rows) if hop == "generate"]
        if calls:
            last_phase.append(len(rows) - calls[-1])
    return {"peak_hops_per_s": round(max(bins.values()) / window_s, 1),
            "last_phase_hops": int(statistics.median(last_phase)) if last_phase else 0}


def hop_delay_p99(hops, model_latency_s: float, exec_latency_s: float) -> float:
    """p99 of the wait added before each hop: its start minus the previous hop's end (minus simulated latency)."""
    simulated = {"generate": model_latency_s, "exec": exec_latency_s}
    by_episode = defaultdict(list)
    for eid, hop, finished, duration in hops:
        if finished is None:
            continue
        end = finished.timestamp()
        by_episode[eid].append((end - (duration or 0.0), end, hop))
    delays = []
    for rows in by_episode.values():
        rows.sort()
        for (_, prev_end, _), (start, _, hop) in zip(rows, rows[1:]):
            delays.append(max(0.0, start - prev_end - simulated.get(hop, 0.0)))
    if not delays:
        return 0.0
    delays.sort()
    return delays[min(len(delays) - 1, int(0.99 * len(delays)))]
