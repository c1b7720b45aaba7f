"""The desktop sandbox on a real Docker engine (issue #20 point 1), and the task family's validation (point 2).

Needs ``megaflow/desktop`` (built here from ``megaflow/base`` if missing: a few
minutes the first time on a bare engine, then cached by content). One desktop
goes through a warm pool: hardening, actions and their observations (a PNG in the
artifact store, the window list, the accessibility tree), a bad action, the reset
that gives the next episode a clean desktop; then one shipped task is validated
(oracle earns 1, nothing earns 0).
"""

from __future__ import annotations

import uuid

import pytest
from conftest import docker_engine, need

from megaflow.errors import SandboxError
from megaflow.sandbox.base import SandboxConfig
from megaflow.sandbox.desktop import DesktopBackend
from megaflow.sandbox.desktop_actions import command
from megaflow.sandbox.desktop_artifacts import ArtifactStore, png_size, refs_in
from megaflow.sandbox.pool import SandboxPool
from megaflow.validate import load_task_set, validate_task

pytestmark = pytest.mark.integration


def desktop_image(monkeypatch) -> None:
    """Build (or find cached) megaflow/desktop on the test engine."""
    import docker
    from megaflow.sandbox.contexts import context_dir
    from megaflow.sandbox.images import build_image

    url = docker_engine(monkeypatch)
    client = docker.DockerClient(base_url=url)
    try:
        build_image(client, context_dir("desktop"), "megaflow/desktop")
    except SandboxError as exc:
        need("the megaflow/desktop image", False, str(exc))
    finally:
        client.close()


@pytest.fixture
def backend(monkeypatch, tmp_path):
    desktop_image(monkeypatch)
    return DesktopBackend(artifacts=ArtifactStore(tmp_path / "artifacts"))


def act(sb, name: str, **args):
    return sb.exec(command(name, args), timeout=60)


def test_a_pooled_desktop_is_locked_down_acts_observes_and_comes_back_clean(backend):
    config = SandboxConfig(type="desktop", mode="persistent", pool_size=1)
    pool = SandboxPool(lambda kind: backend)
    labels = {"test": uuid.uuid4().hex[:12]}
    sb = pool.acquire(config, labels)
    try:
        # The docker backend's hardening: unprivileged, no capabilities, loopback only, read-only root.
        r = sb.exec("id -u; grep CapEff /proc/self/status; ls /sys/class/net; touch /usr/x 2>&1 || echo ro")
        assert r.stdout.split() == ["1000", "CapEff:", "0000000000000000", "lo", *r.stdout.split()[4:]]
        assert r.stdout.rstrip().endswith("ro")

        sb.write_file("notes.txt", b"")
        assert sb.exec("megaflow-desktop launch mousepad notes.txt").exit_code == 0
        obs = act(sb, "type", text="hello desktop")
        assert obs.exit_code == 0 and "action: type hello desktop (ok)" in obs.stdout
        assert "notes.txt - Mousepad' at x=" in obs.stdout and "[active]" in obs.stdout
        [ref] = refs_in(obs.stdout)
        assert png_size(backend.artifacts.get(ref)) == (1024, 768)
        act(sb, "key", keys="ctrl+s")
        assert sb.read_file("notes.txt") == b"hello desktop"

        tree = act(sb, "accessibility_tree").stdout
        assert "accessibility tree:\napplication 'mousepad'" in tree and "text=" in tree

        bad = sb.exec("megaflow-desktop click 5", timeout=30)
        assert bad.exit_code == 2 and "click needs 2 argument(s)" in bad.stdout
        # A command that is no action runs as in any sandbox: the display is there for checks.
        assert "Mousepad" in sb.exec("wmctrl -l").stdout
    finally:
        assert pool.release(sb, config)  # reset: every application killed, home emptied, a fresh session
    again = pool.acquire(config, labels)
    try:
        assert again.id == sb.id
        obs = act(again, "screenshot")
        assert "windows: none" in obs.stdout and refs_in(obs.stdout)
        assert set(again.exec("ls -A").stdout.split()) <= {".cache"}  # the new session's own (openbox)
    finally:
        again.close()
        pool.close()
    assert backend.list_ids(labels) == []


def test_a_shipped_computer_task_validates(backend, tmp_path):
    [task] = [t for t in load_task_set("examples/computer/tasks.yaml") if t.instance_id == "editor-save-text"]
    report = validate_task(backend, SandboxConfig(type="desktop"), task, tmp_path, timeout=60)
    assert report.ok, report.problems
    assert (report.gold, report.empty) == (1.0, 0.0)


def test_the_desktop_bench_reports_its_figures_beside_their_floors(monkeypatch):
    import docker
    from megaflow.bench.desktop import format_desktop_figures, run_desktop_bench

    desktop_image(monkeypatch)
    figures = run_desktop_bench(n=2, creates=1, client=docker.from_env())
    for key in ("desktop_create_p50_s", "docker_create_p50_s", "screenshot_p50_s", "raw_screenshot_p50_s",
                "ratio_screenshot_to_raw", "actions_per_s", "memory_per_desktop_mb", "memory_idle_desktop_mb"):
        assert figures[key] > 0, key
    assert figures["memory_per_desktop_mb"] > figures["memory_idle_desktop_mb"]
    assert figures["targets"] == {"ratio_screenshot_to_raw_max": 1.2}
    assert len(format_desktop_figures(figures)) == 10
