"""`megaflow bench pipeline`: the whole episode pipeline with a zero-latency scripted
model and a no-op (in-memory) environment, through the configured broker and
database, beside raw Celery and raw AMQP floors measured in the same run.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path

from celery import chord
from sqlalchemy import func, select

from megaflow.app import make_app
from megaflow.bench.floors import (
    celery_noop_tasks_per_s,
    celery_relay_tasks_per_s,
    raw_amqp_msgs_per_s,
    wait_for_worker,
)
from megaflow.client import Client
from megaflow.config import Settings
from megaflow.db.models import Episode, Event, Hop, Step
from megaflow.db.schema import upgrade
from megaflow.local_stack import WorkerProcess, stack_workers


def bench_spec(episodes: int, steps: int) -> dict:
    replies = ["```bash\necho {step}\n```"] * steps + ["```bash\nsubmit\n```"]
    rollouts = 8 if episodes % 8 == 0 else 1
    return {
        "name": "bench-pipeline",
        "rollouts": rollouts,
        "model": {"type": "scripted", "replies": replies},
        "sandbox": {"type": "memory"},
        "limits": {"max_steps": steps + 2},
        "tasks": [{"instance_id": f"b{i}", "instruction": "bench", "check": "true"}
                  for i in range(episodes // rollouts)],
    }


def run_pipeline_bench(episodes: int = 200, steps: int = 3, chord_size: int = 1024,
                       settings: Settings | None = None, compare: dict[str, str] | None = None) -> dict:
    settings = settings or Settings()
    if settings.embedded:
        raise SystemExit("bench pipeline needs a real broker: set MEGAFLOW_BROKER_URL and MEGAFLOW_DATABASE_URL")
    settings = settings.model_copy(update={
        "data_dir": Path(tempfile.mkdtemp(prefix="megaflow-bench-")),
        # Room for every episode at once: the figure is the pipeline's, not admission's
        # under contention (with the default 64, most episodes would wait once).
        "sandbox_capacity": max(settings.sandbox_capacity, episodes + 64)})
    upgrade(settings.resolved_database_url())
    app = make_app(settings)
    figures: dict = {}
    figures["raw_amqp_msgs_per_s"] = round(raw_amqp_msgs_per_s(settings.resolved_broker_url()), 1)
    # The floor is stock Celery: publishing without the confirms MegaFlow turns on.
    floor_app = make_app(settings)
    floor_app.conf.broker_transport_options = {}
    figures["celery_noop_tasks_per_s"] = round(celery_noop_tasks_per_s(floor_app, settings), 1)
    # Every hop hands on to the next (with confirms, as the pipeline publishes): that floor too.
    figures["celery_relay_tasks_per_s"] = round(celery_relay_tasks_per_s(app, settings), 1)
    workers = [w.start() for w in stack_workers(settings, f"bench-{uuid.uuid4().hex[:4]}-")]
    try:
        for w in workers:
            wait_for_worker(app, w.name)
        figures.update(pipeline_figures(Client(settings, app=app), episodes, steps))
        figures["ratio_pipeline_to_noop"] = round(
            figures["pipeline_tasks_per_s"] / figures["celery_noop_tasks_per_s"], 3)
        figures["ratio_pipeline_to_relay"] = round(
            figures["pipeline_tasks_per_s"] / figures["celery_relay_tasks_per_s"], 3)
        figures["chord_close_s"] = round(chord_close_s(app, settings, chord_size), 4)
    finally:
        for w in workers:
            w.stop()
    figures["chord_size"] = chord_size
    if compare:
        figures.update(chord_close_by_backend(settings, chord_size, compare))
    return figures


def pipeline_figures(client: Client, episodes: int, steps: int) -> dict:
    t0 = time.perf_counter()
    run_id = client.submit(bench_spec(episodes, steps))
    st = client.wait(run_id, timeout=3600, poll=0.5)
    elapsed = time.perf_counter() - t0
    with client.session() as s:
        ids = select(Episode.id).where(Episode.run_id == run_id)
        hops = s.execute(select(func.count()).select_from(Hop).where(Hop.subject_id.in_(ids))).scalar()
        n_steps = s.execute(select(func.count()).select_from(Step).where(Step.episode_id.in_(ids))).scalar()
    # Celery tasks run: every ledgered hop, plus group.start per group and the callbacks.
    n_groups = len(bench_spec(episodes, steps)["tasks"])
    tasks = hops + n_groups * 2 + 1
    return {
        "episodes": episodes,
        "succeeded": st["by_state"].get("succeeded", 0),
        "pipeline_seconds": round(elapsed, 3),
        "pipeline_tasks": tasks,
        "pipeline_tasks_per_s": round(tasks / elapsed, 1),
        "pipeline_steps_per_s": round(n_steps / elapsed, 1),
    }


def chord_close_s(app, settings: Settings, size: int, queue: str | None = None) -> float:
    """Seconds from the last of `size` members finishing to the chord body starting."""
    key = uuid.uuid4().hex
    route = {"queue": queue, "exchange": "megaflow", "routing_key": queue} if queue else {}
    header = [app.signature("megaflow.bench.member", **route) for _ in range(size)]
    chord(header, app.signature("megaflow.bench.body", args=(key,), **route)).apply_async()
    client = Client(settings, app=app)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        with client.session() as s:
            data = s.execute(select(Event.data).where(Event.kind == "bench.chord", Event.subject_id == key)).scalar()
        if data:
            return data["close_s"]
        time.sleep(0.05)
    raise TimeoutError("bench chord never closed")


def chord_close_by_backend(settings: Settings, size: int, backends: dict[str, str]) -> dict:
    """The same chord on other result backends, each with its own agent worker."""
    out = {}
    for name, url in backends.items():
        alt = settings.model_copy(update={"result_backend": url})
        app = make_app(alt)
        queue = f"megaflow.bench.chord.{uuid.uuid4().hex[:8]}"
        worker = WorkerProcess("agent", alt, name=f"chord-{name}-{uuid.uuid4().hex[:4]}",
                               extra_env={"MEGAFLOW_WORKER_QUEUES": queue}).start()
        try:
            wait_for_worker(app, worker.name)
            out[f"chord_close_s_{name}"] = round(chord_close_s(app, alt, size, queue=queue), 4)
        except Exception as exc:  # noqa: BLE001 - one backend failing must not hide the others
            out[f"chord_close_s_{name}"] = f"error: {type(exc).__name__}: {exc}"
        finally:
            worker.stop()
            with app.connection_for_write() as conn:
                conn.default_channel.queue_delete(queue)
    return out
