"""`megaflow bench env`: what a sandbox costs, on the configured Docker engine.

Figures, each measured in one run against the engine at ``$DOCKER_HOST`` (or the
default socket), with the default, locked-down `SandboxConfig`:

* ``docker_create_p50_s`` / ``docker_create_p95_s``: `DockerBackend.create` (create,
  start, seed the work directory) of an ephemeral sandbox, `n` times, one at a time;
  the close after each is not timed;
* ``pool_acquire_p50_s``: `SandboxPool.acquire` of a warm, idle sandbox (a pool
  pre-warmed with two), `n` acquire/release cycles, the acquire alone timed;
* ``creates_per_s``: ``max(n, 16)`` creates from ``create_threads`` (8) threads at
  once, as a burst of episodes starting on one env host would, successful creates per
  second of wall time, beside ``create_errors`` (creates that raised);
* ``exec_roundtrip_p50_s``: `DockerSandbox.exec('true')`, and
  ``raw_exec_roundtrip_p50_s``: the docker SDK's ``container.exec_run('true')`` on the
  same container, the two interleaved (the order alternating) so load hits both;
  ``ratio_exec_to_raw`` is the ratio of the two medians;
* ``local_create_p50_s``: `LocalBackend.create` + ``close`` (bubblewrap), `n` times.

Every sandbox carries the label ``megaflow.bench.run=<run id>``; at the end every
sandbox with that label is destroyed, and the run fails if any is left.
"""

from __future__ import annotations

import math
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker.errors
import requests

from megaflow.errors import SandboxError
from megaflow.sandbox.base import Sandbox, SandboxConfig
from megaflow.sandbox.docker import DockerBackend
from megaflow.sandbox.pool import SandboxPool

#: Label on every sandbox one bench run makes (value: the run id).
RUN_LABEL = "megaflow.bench.run"
#: Threads of the concurrent-create phase.
THREADS = 8
#: Idle sandboxes the pool is warmed with before the acquire cycles.
POOL_WARM = 2
#: (figure, comparison, bound): what each figure should reach.
TARGETS: tuple[tuple[str, str, float], ...] = (
    ("pool_acquire_p50_s", "<=", 0.02),
    ("docker_create_p50_s", "<=", 0.5),
    ("creates_per_s", ">=", 10.0),
    ("ratio_exec_to_raw", "<=", 1.2),
)


def new_run_id() -> str:
    """A fresh id for the run label."""
    return uuid.uuid4().hex[:12]


def percentile(values: list[float], q: float) -> float:
    """The `q`-th percentile (0-100) of `values`, linearly interpolated between ranks."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def run_env_bench(n: int = 40, client: docker.DockerClient | None = None, run_id: str | None = None) -> dict:
    """Run every phase once; returns the figures (see the module docstring).

    Args:
        n: Samples per timed phase (the concurrent phase creates ``max(n, 16)``).
        client: Docker client; default ``docker.from_env()``.
        run_id: Value of the run label; default a fresh one.

    Raises:
        SystemExit: no Docker engine answers, or the base image is missing.
        RuntimeError: sandboxes of this run were left behind after the cleanup.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    client = client or _client()
    config = SandboxConfig(type="docker")
    try:
        client.images.get(config.image)
    except docker.errors.ImageNotFound:
        raise SystemExit(f"image {config.image!r} not found; build it (megaflow.sandbox.images.build_base)") from None
    run_id = run_id or new_run_id()
    labels = {RUN_LABEL: run_id}
    backend = DockerBackend(client)
    figures: dict = {"n": n}
    try:
        backend.create(config, labels).close()  # warm-up: image lookup, engine info, seed tar
        creates = timed_creates(backend, config, labels, n)
        figures["docker_create_p50_s"] = round(percentile(creates, 50), 4)
        figures["docker_create_p95_s"] = round(percentile(creates, 95), 4)
        figures["pool_acquire_p50_s"] = round(statistics.median(pool_acquires(backend, config, labels, n)), 4)
        rate, errors = concurrent_creates(backend, config, labels, max(n, 2 * THREADS), THREADS)
        figures["creates_per_s"] = round(rate, 2)
        figures["create_threads"] = THREADS
        figures["create_errors"] = errors
        ours, raw = exec_roundtrips(backend, client, config, labels, n)
        figures["exec_roundtrip_p50_s"] = round(statistics.median(ours), 5)
        figures["raw_exec_roundtrip_p50_s"] = round(statistics.median(raw), 5)
        figures["ratio_exec_to_raw"] = round(statistics.median(ours) / statistics.median(raw), 3)
    finally:
        cleanup(backend, labels)
    figures["local_create_p50_s"] = round(statistics.median(local_creates(labels, n)), 4)
    figures["targets"] = {f"{name}_{'max' if op == '<=' else 'min'}": bound for name, op, bound in TARGETS}
    return figures


def timed_creates(backend: DockerBackend, config: SandboxConfig, labels: dict[str, str], n: int) -> list[float]:
    """Seconds of each of `n` sequential ephemeral creates (each closed, untimed, before the next)."""
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        sandbox = backend.create(config, labels)
        samples.append(time.perf_counter() - t0)
        sandbox.close()
    return samples


def pool_acquires(backend: DockerBackend, config: SandboxConfig, labels: dict[str, str], n: int) -> list[float]:
    """Seconds of each of `n` acquires of a warm sandbox from a pre-warmed persistent pool."""
    persistent = config.model_copy(update={"mode": "persistent", "pool_size": POOL_WARM})
    pool = SandboxPool(lambda _type: backend, max_idle=POOL_WARM)
    try:
        warm = [pool.acquire(persistent, labels) for _ in range(POOL_WARM)]
        for sandbox in warm:
            if not pool.release(sandbox, persistent):
                raise SandboxError(f"pool did not keep warm sandbox {sandbox.id[:12]}")
        samples = []
        for _ in range(n):
            idle = set(pool.idle_ids())
            t0 = time.perf_counter()
            sandbox = pool.acquire(persistent, labels)
            samples.append(time.perf_counter() - t0)
            if sandbox.id not in idle:
                pool.release(sandbox, persistent)
                raise SandboxError("pool created a sandbox although a warm one was idle")
            pool.release(sandbox, persistent)
        return samples
    finally:
        pool.close()


def concurrent_creates(backend: DockerBackend, config: SandboxConfig, labels: dict[str, str],
                       count: int, threads: int) -> tuple[float, int]:
    """Create `count` sandboxes from `threads` threads at once; (successful creates/s, errors).

    The sandboxes stay up until every create has returned (so removals do not load
    the engine during the timed window), then are closed.
    """
    made: list[Sandbox] = []
    errors = 0
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def worker(share: int) -> None:
        nonlocal errors
        start.wait()
        for _ in range(share):
            try:
                sandbox = backend.create(config, labels)
            except SandboxError:
                with lock:
                    errors += 1
                continue
            with lock:
                made.append(sandbox)

    shares = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]
    try:
        with ThreadPoolExecutor(threads) as executor:
            t0 = time.perf_counter()
            list(executor.map(worker, shares))
            elapsed = time.perf_counter() - t0
    finally:
        with ThreadPoolExecutor(threads) as executor:
            list(executor.map(lambda sb: sb.close(), made))
    return len(made) / elapsed, errors


def exec_roundtrips(backend: DockerBackend, client: docker.DockerClient, config: SandboxConfig,
                    labels: dict[str, str], n: int) -> tuple[list[float], list[float]]:
    """Seconds of `n` ``exec('true')`` through `DockerSandbox` and `n` through the raw SDK, interleaved."""
    sandbox = backend.create(config, labels)
    try:
        container = client.containers.get(sandbox.id)

        def ours() -> None:
            if sandbox.exec("true").exit_code != 0:
                raise SandboxError("exec('true') failed")

        def raw() -> None:
            if container.exec_run("true").exit_code != 0:
                raise SandboxError("exec_run('true') failed")

        return paired_times(ours, raw, n)
    finally:
        sandbox.close()


def local_creates(labels: dict[str, str], n: int) -> list[float]:
    """Seconds of `n` `LocalBackend` create+close, under a temporary data directory."""
    from megaflow.sandbox.local import LocalBackend

    root = Path(tempfile.mkdtemp(prefix="megaflow-bench-env-"))
    backend = LocalBackend(root)
    config = SandboxConfig(type="local")
    try:
        backend.create(config, labels).close()  # warm-up
        samples = [_time(lambda: backend.create(config, labels).close()) for _ in range(n)]
        if left := backend.list_ids(labels):
            raise RuntimeError(f"local sandboxes left behind: {left}")
        return samples
    finally:
        for sandbox_id in backend.list_ids(labels):
            backend.destroy(sandbox_id)
        shutil.rmtree(root, ignore_errors=True)


def cleanup(backend: DockerBackend, labels: dict[str, str]) -> None:
    """Destroy every container carrying `labels`; raise if any survives.

    Raises:
        RuntimeError: containers of this run are still there after the retries.
    """
    left: list[str] = []
    for _ in range(3):
        left = backend.list_ids(labels)
        if not left:
            return
        for sandbox_id in left:
            try:
                backend.destroy(sandbox_id)
            except SandboxError:
                pass
        time.sleep(0.5)
    if left := backend.list_ids(labels):
        raise RuntimeError(f"bench sandboxes left behind: {[i[:12] for i in left]} (label {labels})")


def figure_line(figures: dict, targets, label: str, key: str, unit: str, extra: str = "", width: int = 31) -> str:
    """One human-readable line of a figure, with its target (from `targets`) and whether it is met."""
    value = figures[key]
    text = f"{label:{width}s} {f'{value:.4g} {unit}':>12s}"
    for name, op, bound in targets:
        if name == key:
            met = value <= bound if op == "<=" else value >= bound
            text += f"   target {op} {f'{bound:g} {unit}':9s} {'ok' if met else 'MISSED'}"
    return text + extra


def format_figures(figures: dict) -> list[str]:
    """One human-readable line per figure, with its target and whether it is met."""

    def line(label: str, key: str, unit: str, extra: str = "") -> str:
        return figure_line(figures, TARGETS, label, key, unit, extra)

    n = figures["n"]
    errors = figures["create_errors"]
    return [
        line("docker create+start p50", "docker_create_p50_s", "s", f"  (n={n})"),
        line("docker create+start p95", "docker_create_p95_s", "s"),
        line("pool acquire (warm) p50", "pool_acquire_p50_s", "s"),
        line("concurrent creates", "creates_per_s", "/s", f"  ({figures['create_threads']} threads, {errors} errors)"
             + ("" if errors == 0 else "  errors: target 0 MISSED")),
        line("exec('true') p50, ours", "exec_roundtrip_p50_s", "s"),
        line("exec_run('true') p50, raw SDK", "raw_exec_roundtrip_p50_s", "s"),
        line("exec ours / raw", "ratio_exec_to_raw", "x"),
        line("local create+close p50", "local_create_p50_s", "s"),
    ]


def _client() -> docker.DockerClient:
    try:
        client = docker.from_env()
        client.ping()
    except (docker.errors.DockerException, requests.RequestException) as exc:
        raise SystemExit(f"no Docker engine answers ({exc}); start one: export DOCKER_HOST=$(docker/start-dockerd.sh)")
    return client


def paired_times(ours: Callable[[], object], raw: Callable[[], object], n: int,
                 warmup: int = 2) -> tuple[list[float], list[float]]:
    """`n` timings of each, taken in pairs whose order alternates, after `warmup` untimed pairs.

    Alternating keeps drift on a shared machine (caches, other jobs) from favouring
    whichever side always runs first.
    """
    for _ in range(warmup):  # connections, page cache
        ours()
        raw()
    a: list[float] = []
    b: list[float] = []
    for i in range(n):
        pair = ((ours, a), (raw, b)) if i % 2 == 0 else ((raw, b), (ours, a))
        for call, samples in pair:
            samples.append(_time(call))
    return a, b


def _time(call: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0
