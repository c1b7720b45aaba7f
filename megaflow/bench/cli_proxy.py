"""`megaflow bench env --cli`: what the CLI agents' model proxy costs (issue 19 point 4).

Two phases on a real broker and database, the proxy (`megaflow.hops.cli_proxy`) in
this process as an env worker runs it, a real model worker on a private queue:

* **Overhead per call.** One request at a time, alternately (each order half the
  time) through the proxy — Unix socket, bearer token, the call recorded as a step,
  a ``megaflow.hop.generate`` message, the model worker's OpenAI backend, the
  ledger — and straight to the same real OpenAI-compatible server (SmolLM2) with the
  body our backend sends: ``proxy_tokens_per_s`` against the floor
  ``direct_tokens_per_s``; ``ratio_proxy_to_direct`` (target >= 0.95), and
  ``proxy_overhead_ms``, the median of the paired differences.
* **Episodes in flight.** `in_flight` CLI episodes parked on this host (each with its
  deadline timer), every one with a model call open on the proxy at the same time
  (sent while no model worker consumes, so all of them wait at once), then
  answered by the scripted model: ``cli_in_flight`` (calls seen waiting at once),
  ``threads_added`` (threads this process gained meanwhile: none per episode),
  ``rss_added_mb`` and ``rss_per_episode_kb`` (this process's memory with all of them
  open, the clients' sockets included: an upper bound for the proxy), and
  ``in_flight_drain_s`` / ``in_flight_calls_per_s`` once the worker starts.

The agent programs themselves (sandboxes) are not part of these figures.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

from sqlalchemy import select, update

from megaflow.app import make_app
from megaflow.bench.floors import wait_for_worker
from megaflow.bench.model import bench_prompt
from megaflow.client import Client, as_spec
from megaflow.config import Settings
from megaflow.db import states
from megaflow.db.models import Episode, Step, utcnow
from megaflow.db.schema import upgrade
from megaflow.hops.cli_proxy import CliProxy
from megaflow.local_stack import WorkerProcess
from megaflow.runtime import Runtime

#: (figure, comparison, bound): what each figure should reach.
TARGETS: tuple[tuple[str, str, float], ...] = (("ratio_proxy_to_direct", ">=", 0.95), ("cli_in_flight", ">=", 1000))


def run_cli_bench(calls: int = 20, in_flight: int = 1000, max_tokens: int = 32,
                  settings: Settings | None = None) -> dict:
    """Run both phases; returns the figures (see the module docstring).

    Raises:
        SystemExit: no real broker is configured.
    """
    from megaflow.model.server import openai_server

    settings = settings or Settings()
    if settings.embedded:
        raise SystemExit("bench env --cli needs a real broker: set MEGAFLOW_BROKER_URL and MEGAFLOW_DATABASE_URL")
    settings = settings.model_copy(update={"data_dir": Path(tempfile.mkdtemp(prefix="megaflow-bench-cli-")),
                                           "host": f"bench-cli-{uuid.uuid4().hex[:6]}"})
    upgrade(settings.resolved_database_url())
    app = make_app(settings)
    client = Client(settings, app=app)
    queue = f"megaflow.bench.cli.{uuid.uuid4().hex[:8]}"
    rt = Runtime(settings)
    proxy = CliProxy(app, rt)
    proxy.model_queue = queue
    worker = None
    figures: dict = {"calls": calls, "in_flight": in_flight, "max_tokens": max_tokens}
    try:
        proxy.start()
        scripted = _parked_episodes(client, settings, {"type": "scripted", "replies": ["ok"]}, in_flight)
        figures.update(_in_flight(proxy, scripted, start_worker=lambda: _start(settings, queue)))
        worker = figures.pop("_worker")
        wait_for_worker(app, worker.name, timeout=300)
        with openai_server(startup_timeout_s=900) as url:
            model = {"type": "openai", "model": "smollm2", "endpoints": [url], "max_retries": 0,
                     "sampling": {"max_tokens": max_tokens}}
            real = _parked_episodes(client, settings, model, calls)
            figures.update(_overhead(proxy, real, url, model))
    finally:
        if worker is not None:
            worker.stop()
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
        rt.close()
    return figures


def _start(settings: Settings, queue: str) -> WorkerProcess:
    return WorkerProcess("model", settings, name=f"bench-cli-model-{uuid.uuid4().hex[:6]}",
                         extra_env={"MEGAFLOW_WORKER_QUEUES": queue}).start()


def _parked_episodes(client: Client, settings: Settings, model: dict, n: int) -> list[str]:
    """Record a CLI run of `n` episodes as the env hop leaves them: running, program started, parked."""
    spec = as_spec({"name": "bench-cli", "model": model, "agent": {"type": "cli", "command": "true"},
                    "sandbox": {"type": "memory"}, "limits": {"max_steps": 10},
                    "tasks": [{"instance_id": f"c{i}", "instruction": "bench", "check": "true"} for i in range(n)]})
    run_id, _ = client._record(spec)  # recorded, never published: only the proxy's hops run
    with client.session() as s:
        ids = list(s.execute(select(Episode.id).where(Episode.run_id == run_id).order_by(Episode.seq)).scalars())
        s.execute(update(Episode).where(Episode.run_id == run_id).values(
            state=states.RUNNING, host=settings.host, parked={"task": {}, "cli": True}, n_steps=1,
            deadline_at=utcnow() + dt.timedelta(hours=1)))
        s.add_all(Step(episode_id=eid, index=0, messages_in=[], action="(bench)", exit_code=0) for eid in ids)
    return ids


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _in_flight(proxy: CliProxy, episodes: list[str], start_worker) -> dict:
    """Every episode's call open at once, then answered; see the module docstring."""
    import aiohttp

    for eid in episodes:
        proxy.watch(eid, utcnow() + dt.timedelta(hours=1))
    threads0, rss0 = threading.active_count(), _rss_mb()
    peak = {"waiting": 0, "threads": 0, "rss": 0.0}
    started: dict = {}

    async def main() -> list[int]:
        connector = aiohttp.UnixConnector(path=str(proxy.path), limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=900)) as http:
            async def call(i: int, eid: str) -> int:
                body = {"model": "x", "messages": [{"role": "user", "content": bench_prompt(i)}]}
                try:
                    async with http.post("http://megaflow/v1/chat/completions", json=body,
                                         headers={"Authorization": f"Bearer {proxy.token(eid)}"}) as r:
                        return r.status
                except aiohttp.ClientError:  # counted: in_flight_ok says how many were answered
                    return -1

            tasks = [asyncio.create_task(call(i, eid)) for i, eid in enumerate(episodes)]
            deadline = time.monotonic() + 600
            # Until every call waits in the proxy, or was answered already (refused, failed).
            while (len(proxy._pending) + sum(t.done() for t in tasks) < len(episodes)
                   and time.monotonic() < deadline):
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.5)
            peak.update(waiting=len(proxy._pending), threads=threading.active_count(), rss=_rss_mb())
            started["worker"] = start_worker()
            started["t0"] = time.monotonic()
            return await asyncio.gather(*tasks)

    codes = asyncio.run(main())
    drain = time.monotonic() - started["t0"]
    ok = sum(1 for c in codes if c == 200)
    return {"_worker": started["worker"], "cli_in_flight": peak["waiting"], "in_flight_ok": ok,
            "threads_before": threads0, "threads_added": peak["threads"] - threads0,
            "rss_before_mb": round(rss0, 1), "rss_added_mb": round(peak["rss"] - rss0, 1),
            "rss_per_episode_kb": round((peak["rss"] - rss0) * 1024 / max(1, len(episodes)), 1),
            "in_flight_drain_s": round(drain, 2), "in_flight_calls_per_s": round(ok / drain, 1)}


def _overhead(proxy: CliProxy, episodes: list[str], url: str, model: dict) -> dict:
    """Paired calls, through the proxy and straight to the server, one at a time."""
    import httpx

    from megaflow.model.base import Message, ModelRequest, SamplingParams
    from megaflow.model.config import OpenAIModelConfig
    from megaflow.model.openai_http import OpenAIModel

    backend = OpenAIModel(OpenAIModelConfig(model="smollm2", endpoints=[url], max_retries=0))
    sampling = SamplingParams(max_tokens=model["sampling"]["max_tokens"])
    via = httpx.Client(transport=httpx.HTTPTransport(uds=str(proxy.path)), base_url="http://megaflow",
                       timeout=600.0)
    direct = httpx.Client(base_url=url, timeout=600.0)
    totals = {"proxy": [0, 0.0], "direct": [0, 0.0]}
    diffs = []
    try:
        for i, eid in enumerate(episodes):
            messages = [{"role": "user", "content": bench_prompt(i)}]
            body = backend._body(ModelRequest(messages=[Message(**m) for m in messages], sampling=sampling))

            def through_proxy(eid=eid, messages=messages) -> int:
                r = via.post("/v1/chat/completions", json={"model": "x", "messages": messages},
                             headers={"Authorization": f"Bearer {proxy.token(eid)}"})
                return r.raise_for_status().json()["usage"]["completion_tokens"]

            def straight(body=body) -> int:
                return direct.post("/chat/completions", json=body).raise_for_status().json()["usage"][
                    "completion_tokens"]

            order = [("proxy", through_proxy), ("direct", straight)]
            took = {}
            for side, call in order if i % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                tokens = call()
                took[side] = time.perf_counter() - t0
                if i >= 2:  # the first two warm the connections, the worker and the server
                    totals[side][0] += tokens
                    totals[side][1] += took[side]
            if i >= 2:
                diffs.append(took["proxy"] - took["direct"])
    finally:
        via.close()
        direct.close()
        backend.close()
    figures = {}
    for side, (tokens, seconds) in totals.items():
        figures.update({f"{side}_tokens": tokens, f"{side}_tokens_per_s": round(tokens / seconds, 1)})
    figures["ratio_proxy_to_direct"] = round(figures["proxy_tokens_per_s"] / figures["direct_tokens_per_s"], 3)
    figures["proxy_overhead_ms"] = round(statistics.median(diffs) * 1000, 1)
    return figures


def format_cli_figures(figures: dict) -> list[str]:
    """The figures as lines for a terminal, each beside its target."""
    lines = [f"through the proxy       {figures['proxy_tokens_per_s']:9.1f} tokens/s",
             f"direct to the server    {figures['direct_tokens_per_s']:9.1f} tokens/s (the floor)",
             (f"proxy overhead          {figures['proxy_overhead_ms']:9.1f} ms/call (median of "
              f"{figures['calls']} pairs)"),
             (f"CLI episodes in flight  {figures['cli_in_flight']:9d} calls open at once, "
              f"{figures['threads_added']} threads added, {figures['rss_added_mb']} MB "
              f"({figures['rss_per_episode_kb']} kB/episode)"),
             f"  answered              {figures['in_flight_ok']:9d} in {figures['in_flight_drain_s']} s"]
    for name, op, bound in TARGETS:
        value = figures[name]
        ok = value >= bound if op == ">=" else value <= bound
        lines.append(f"target {name} {op} {bound:g}: {value} {'met' if ok else 'NOT met'}")
    return lines
