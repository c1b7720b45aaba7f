"""`megaflow bench env --desktop`: what a desktop sandbox costs (issue #20 point 4).

Figures, measured in one run against the engine at ``$DOCKER_HOST`` with the
``megaflow/desktop`` image (``megaflow env build-base --desktop``):

* ``desktop_create_p50_s`` / ``_p95_s``: `DesktopBackend.create` (container, then Xvfb,
  session bus and window manager up), `creates` times one at a time, beside its floor
  ``docker_create_p50_s``: a plain Docker sandbox of the same image (no session);
* ``screenshot_p50_s``: one ``screenshot`` action's round trip (an exec running the
  helper: the capture, the window list, the PNG read back and stored in the artifact
  store), beside ``raw_screenshot_p50_s``: ``scrot`` run directly in the same
  container and its PNG read back in one exec, the two interleaved (order
  alternating); ``ratio_screenshot_to_raw`` is the ratio of the medians;
* ``actions_per_s``: ``move``/``click`` actions on the desktop, each with its
  observation (settle time, screenshot, window list), one after the other, per
  second of wall time; ``action_p50_s`` each;
* ``memory_per_desktop_mb``: the container's memory (cgroup usage less inactive file
  pages, as ``docker stats`` counts it) with the editor and a terminal open, beside
  ``memory_idle_desktop_mb`` (the session alone).

Every sandbox carries the label ``megaflow.bench.run=<run id>`` and is destroyed at the end.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import docker.errors

import docker
from megaflow.bench.env import RUN_LABEL, _client, _time, cleanup, figure_line, new_run_id, paired_times, percentile
from megaflow.errors import SandboxError
from megaflow.sandbox.base import SandboxConfig
from megaflow.sandbox.desktop import DESKTOP_IMAGE, DesktopBackend, DesktopSandbox
from megaflow.sandbox.desktop_artifacts import ArtifactStore

TARGETS: tuple[tuple[str, str, float], ...] = (("ratio_screenshot_to_raw", "<=", 1.2),)


def run_desktop_bench(n: int = 20, creates: int = 5, client: docker.DockerClient | None = None) -> dict:
    """Run every phase once; returns the figures (see the module docstring).

    Raises:
        SystemExit: no Docker engine answers, or the desktop image is missing.
        RuntimeError: sandboxes of this run were left behind.
    """
    if n < 2 or creates < 1:
        raise ValueError("n must be at least 2 and creates at least 1")
    client = client or _client()
    try:
        client.images.get(DESKTOP_IMAGE)
    except docker.errors.ImageNotFound:
        raise SystemExit(f"image {DESKTOP_IMAGE!r} not found; build it: megaflow env build-base --desktop") from None
    labels = {RUN_LABEL: new_run_id()}
    store_dir = Path(tempfile.mkdtemp(prefix="megaflow-bench-desktop-"))
    backend = DesktopBackend(client, artifacts=ArtifactStore(store_dir))
    config = SandboxConfig(type="desktop")
    figures: dict = {"n": n, "creates": creates}
    try:
        backend.create(config, labels).close()  # warm-up: image lookup, seed tar, page cache
        desk = [_time(lambda: backend.create(config, labels).close()) for _ in range(creates)]
        plain = [_time(lambda: backend.docker.create(config.model_copy(update={"type": "docker",
                                                                               "image": DESKTOP_IMAGE}),
                                                     labels).close()) for _ in range(creates)]
        figures["desktop_create_p50_s"] = round(percentile(desk, 50), 3)
        figures["desktop_create_p95_s"] = round(percentile(desk, 95), 3)
        figures["docker_create_p50_s"] = round(percentile(plain, 50), 3)
        sb = backend.create(config, labels)
        try:
            figures["memory_idle_desktop_mb"] = round(memory_mb(client, sb.id), 1)
            for app in ("mousepad", "xterm"):
                if sb.exec(f"megaflow-desktop launch {app}", timeout=60).exit_code != 0:
                    raise SandboxError(f"{app} did not open in the bench desktop")
            ours, raw = screenshots(sb, n)
            figures["screenshot_p50_s"] = round(statistics.median(ours), 4)
            figures["raw_screenshot_p50_s"] = round(statistics.median(raw), 4)
            figures["ratio_screenshot_to_raw"] = round(statistics.median(ours) / statistics.median(raw), 3)
            steps = actions(sb, n)
            figures["action_p50_s"] = round(statistics.median(steps), 4)
            figures["actions_per_s"] = round(len(steps) / sum(steps), 2)
            figures["memory_per_desktop_mb"] = round(memory_mb(client, sb.id), 1)
        finally:
            sb.close()
    finally:
        cleanup(backend.docker, labels)
        shutil.rmtree(store_dir, ignore_errors=True)
    figures["targets"] = {f"{name}_{'max' if op == '<=' else 'min'}": bound for name, op, bound in TARGETS}
    return figures


def screenshots(sb: DesktopSandbox, n: int) -> tuple[list[float], list[float]]:
    """Seconds of `n` screenshot actions and `n` raw captures, interleaved (after two of each to warm up)."""

    def ours() -> None:
        if sb.act("screenshot").screenshot is None:
            raise SandboxError("the screenshot action returned no screenshot")

    def raw() -> None:
        if not sb.raw_screenshot().startswith(b"\x89PNG"):
            raise SandboxError("scrot returned no PNG")

    return paired_times(ours, raw, n)


def actions(sb: DesktopSandbox, n: int) -> list[float]:
    """Seconds of `n` actions (move and click on the empty right edge, alternating), each observed."""
    samples = []
    for i in range(n):
        argv = ("move", "1010", str(100 + i)) if i % 2 else ("click", "1010", str(100 + i))
        started = time.perf_counter()
        obs = sb.act(*argv)
        samples.append(time.perf_counter() - started)
        if obs.exit_code != 0:
            raise SandboxError(f"action {argv} failed: {obs.view.messages}")
    return samples


def memory_mb(client: docker.DockerClient, container_id: str) -> float:
    """The container's memory as ``docker stats`` shows it: usage less inactive file pages."""
    stats = client.api.stats(container_id, stream=False)["memory_stats"]
    detail = stats.get("stats", {})
    cache = detail.get("inactive_file", detail.get("total_inactive_file", 0))
    return (stats["usage"] - cache) / 2**20


def format_desktop_figures(figures: dict) -> list[str]:
    """One human-readable line per figure, with the target where there is one."""

    def line(label: str, key: str, unit: str, extra: str = "") -> str:
        return figure_line(figures, TARGETS, label, key, unit, extra, width=34)

    return [
        line("desktop create (session up) p50", "desktop_create_p50_s", "s", f"  (n={figures['creates']})"),
        line("desktop create p95", "desktop_create_p95_s", "s"),
        line("docker create, same image, p50", "docker_create_p50_s", "s"),
        line("screenshot round trip p50", "screenshot_p50_s", "s", f"  (n={figures['n']})"),
        line("raw scrot in the container p50", "raw_screenshot_p50_s", "s"),
        line("screenshot ours / raw", "ratio_screenshot_to_raw", "x"),
        line("action with observation p50", "action_p50_s", "s"),
        line("actions per second", "actions_per_s", "/s"),
        line("memory, idle desktop", "memory_idle_desktop_mb", "MiB"),
        line("memory, editor + terminal open", "memory_per_desktop_mb", "MiB"),
    ]
