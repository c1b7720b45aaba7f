"""`megaflow bench model`: what the Model Service costs on top of the model itself.

Three figures, each beside its own floor measured in the same run:

* ``direct_tokens_per_s``: the prompts as concurrent `generate()` calls on an
  in-process `TransformersModel` (dynamic batching, nothing else);
* ``queue_tokens_per_s``: the same prompts as ``megaflow.hop.generate`` messages
  through the broker to a real model worker with the same model config, each hop
  reading its prompt from the database and writing the completion back;
* ``http_overhead_ms``: our OpenAI HTTP backend against a raw httpx POST of the same
  body to the same real server, per request: medians of paired differences, the two
  sent one after the other (each order half the time), one request at a time; and
  ``http_overhead_cpu_ms``, the same on the client thread's CPU time, which waiting
  on the server does not blur.

Direct and queue rounds alternate, so a change in the machine's load hits both.
"""

from __future__ import annotations

import datetime as dt
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import func, select

from megaflow.app import make_app
from megaflow.bench.floors import wait_for_worker
from megaflow.client import Client, as_spec
from megaflow.config import Settings
from megaflow.db.models import Episode, Hop, Step
from megaflow.db.schema import upgrade
from megaflow.local_stack import WorkerProcess
from megaflow.model.base import Message, ModelRequest, SamplingParams
from megaflow.model.config import TransformersModelConfig


def bench_prompt(i: int) -> str:
    """The `i`-th of the benches' distinct short prompts."""
    return f"In two sentences, say something true about the number {i}."


def bench_prompts(n: int) -> list[str]:
    """`n` distinct short prompts, the same for every phase."""
    return [bench_prompt(i) for i in range(n)]


def run_model_bench(concurrency: int = 8, max_tokens: int = 32, rounds: int = 2, http_requests: int = 50,
                    settings: Settings | None = None) -> dict:
    """Run the three phases; returns the figures (see the module docstring).

    Raises:
        SystemExit: no real broker is configured.
    """
    settings = settings or Settings()
    if settings.embedded:
        raise SystemExit("bench model needs a real broker: set MEGAFLOW_BROKER_URL and MEGAFLOW_DATABASE_URL")
    settings = settings.model_copy(update={"data_dir": Path(tempfile.mkdtemp(prefix="megaflow-bench-"))})
    config = TransformersModelConfig(max_batch_size=concurrency, max_wait_ms=50.0,
                                     sampling=SamplingParams(max_tokens=max_tokens))
    figures: dict = {"concurrency": concurrency, "max_tokens": max_tokens, "rounds": rounds}
    figures.update(generation_figures(settings, config, bench_prompts(concurrency), rounds))
    figures.update(http_figures(http_requests))
    return figures


def generation_figures(settings: Settings, config: TransformersModelConfig, prompts: list[str],
                       rounds: int) -> dict:
    """Tokens per second of the prompts in-process and through the queue, rounds interleaved.

    Both models stay loaded and the rounds alternate (direct first, then queue first),
    so a change in the machine's load during the run hits both sides alike. An idle
    model costs no CPU: its batcher thread sleeps.
    """
    from megaflow.model.hf import TransformersModel

    upgrade(settings.resolved_database_url())
    app = make_app(settings)
    client = Client(settings, app=app)
    # A private queue: other model workers on this broker must not take the bench's hops.
    queue = f"megaflow.bench.model.{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess("model", settings, name=f"bench-model-{uuid.uuid4().hex[:6]}",
                           extra_env={"MEGAFLOW_WORKER_QUEUES": queue}).start()
    model = TransformersModel(config)
    totals = {"direct": [0, 0.0], "queue": [0, 0.0]}
    try:
        model.load()
        wait_for_worker(app, worker.name, timeout=120)
        batches = _episodes_with_prompts(client, config, prompts, rounds + 1)
        # Warm-up rounds (the worker loads its model now): first-call costs are not the figure.
        _direct_round(model, prompts, config.sampling)
        _generate_all(app, client, queue, batches[0])
        before = model.stats.batches
        for r in range(rounds):
            sides = [("direct", lambda: _direct_round(model, prompts, config.sampling)),
                     ("queue", lambda ids=batches[r + 1]: _generate_all(app, client, queue, ids))]
            for side, run in sides if r % 2 == 0 else reversed(sides):
                seconds, tokens = run()
                totals[side][0] += tokens
                totals[side][1] += seconds
        direct_batches = model.stats.sizes[before:]
    finally:
        model.close()
        worker.stop()
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
    figures = {}
    for side, (tokens, seconds) in totals.items():
        figures.update({f"{side}_tokens": tokens, f"{side}_seconds": round(seconds, 3),
                        f"{side}_tokens_per_s": round(tokens / seconds, 1)})
    figures["direct_batches"] = direct_batches
    figures["ratio_queue_to_direct"] = round(figures["queue_tokens_per_s"] / figures["direct_tokens_per_s"], 3)
    return figures


def _direct_round(model, prompts: list[str], sampling: SamplingParams) -> tuple[float, int]:
    """(seconds, completion tokens) of the prompts as concurrent in-process calls."""
    t0 = time.perf_counter()
    completions = _concurrently(model, prompts, sampling)
    return time.perf_counter() - t0, sum(c.usage.completion_tokens for c in completions)


def _concurrently(model, prompts: list[str], sampling: SamplingParams) -> list:
    requests = [ModelRequest(messages=[Message(role="user", content=p)], sampling=sampling) for p in prompts]
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(model.generate, requests))


def _episodes_with_prompts(client: Client, config: TransformersModelConfig, prompts: list[str],
                           batches: int) -> list[list[str]]:
    """Record a run whose episodes each wait at step 0 with one prompt; returns episode ids per batch."""
    n = len(prompts) * batches
    spec = as_spec({"name": "bench-model", "model": config.model_dump(mode="json"), "sandbox": {"type": "memory"},
                    "tasks": [{"instance_id": f"m{i}", "instruction": "bench", "check": "true"}
                              for i in range(n)]})
    run_id, _ = client._record(spec)  # recorded, never published: only the generate hops run
    with client.session() as s:
        ids = list(s.execute(select(Episode.id).where(Episode.run_id == run_id).order_by(Episode.seq)).scalars())
        s.add_all(Step(episode_id=eid, index=0,
                       messages_in=[{"role": "user", "content": prompts[i % len(prompts)]}])
                  for i, eid in enumerate(ids))
    return [ids[b * len(prompts):(b + 1) * len(prompts)] for b in range(batches)]


def _generate_all(app, client: Client, queue: str, episode_ids: list[str], timeout: float = 600.0) -> tuple:
    """Send one generate hop per episode at once; (seconds until the last was recorded, completion tokens).

    The end is when the last hop's ledger row was written (the worker's clock, the same
    host's here), read after a slow poll: polling every few milliseconds would take
    CPU from the model being timed.
    """
    t0 = time.time()
    with app.producer_or_acquire() as producer:
        for eid in episode_ids:
            app.signature("megaflow.hop.generate", args=(eid, 0), queue=queue, exchange="megaflow",
                          routing_key=queue).apply_async(producer=producer)
    done = select(func.count(), func.sum(Step.completion_tokens)).where(
        Step.episode_id.in_(episode_ids), Step.index == 0, Step.completion.is_not(None))
    while True:
        time.sleep(0.25)
        with client.session() as s:
            count, tokens = s.execute(done).one()
            if count == len(episode_ids):
                last = s.execute(select(func.max(Hop.finished_at)).where(
                    Hop.subject_id.in_(episode_ids), Hop.hop == "generate")).scalar_one()
                if last.tzinfo is None:  # SQLite hands back naive datetimes, written in UTC
                    last = last.replace(tzinfo=dt.UTC)
                return last.timestamp() - t0, int(tokens or 0)
        if time.time() - t0 > timeout:
            raise TimeoutError(f"{count} of {len(episode_ids)} generate hops done after {timeout:.0f}s")


def http_figures(n: int) -> dict:
    """Per-request latency of `OpenAIModel` and of a raw httpx POST to the same real server."""
    import httpx

    from megaflow.model.config import OpenAIModelConfig
    from megaflow.model.openai_http import OpenAIModel
    from megaflow.model.server import openai_server

    sampling = SamplingParams(max_tokens=1)  # the server's own time small and steady, so the gap shows
    request = ModelRequest(messages=[Message(role="user", content="Say hi.")], sampling=sampling)
    # max_wait_ms=0: a lone request must not wait for a batch to fill.
    with openai_server(max_batch_size=1, max_wait_ms=0.0) as url:
        ours = OpenAIModel(OpenAIModelConfig(model="smollm2", endpoints=[url], max_retries=0))
        body = ours._body(request)  # the very body ours sends
        raw = httpx.Client(base_url=url, timeout=60.0)
        ours_s, raw_s, ours_cpu, raw_cpu = [], [], [], []

        def call_ours() -> None:
            ours.generate(request)

        def call_raw() -> None:
            raw.post("/chat/completions", json=body).raise_for_status().json()

        try:
            for i in range(n + 2):
                # Each order half the time: drift in the server's speed hits both alike.
                order = [("ours", call_ours), ("raw", call_raw)]
                times = {name: _timed(call) for name, call in (order if i % 2 == 0 else order[::-1])}
                if i >= 2:  # the first two open connections and warm the server
                    ours_s.append(times["ours"][0])
                    raw_s.append(times["raw"][0])
                    ours_cpu.append(times["ours"][1])
                    raw_cpu.append(times["raw"][1])
        finally:
            ours.close()
            raw.close()
    diffs = [(o - r) * 1000 for o, r in zip(ours_s, raw_s)]
    # Whichever goes first in a pair may be systematically slower (a server waking up):
    # the mean of the two orders' medians cancels that, where one median of all would not.
    overhead = (statistics.median(diffs[0::2]) + statistics.median(diffs[1::2])) / 2
    # The client's own CPU time does not include waiting on the server, so it shows the
    # overhead even where the server's time varies far more than the overhead itself.
    cpu_ms = (statistics.median(ours_cpu) - statistics.median(raw_cpu)) * 1000
    return {"http_requests": n, "http_ours_median_ms": round(statistics.median(ours_s) * 1000, 2),
            "http_raw_median_ms": round(statistics.median(raw_s) * 1000, 2),
            "http_overhead_ms": round(overhead, 2), "http_overhead_cpu_ms": round(cpu_ms, 3)}


def _timed(call) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) of one call."""
    t0, c0 = time.perf_counter(), time.thread_time()
    call()
    return time.perf_counter() - t0, time.thread_time() - c0
