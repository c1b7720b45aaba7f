"""`megaflow bench env` against a real Docker engine, with small n: keys, sane values, no leftovers.

Skips without a Docker engine or the ``megaflow/base`` image, except under ``CI=true``
where it fails (`conftest.need`).
"""

from __future__ import annotations

import json
import os
import tempfile

import docker.errors  # binds `docker` too
import pytest
from conftest import need
from typer.testing import CliRunner

from megaflow.bench import env as env_bench
from megaflow.bench.env import RUN_LABEL, format_figures, percentile
from megaflow.errors import SandboxError

FIGURES = (
    "docker_create_p50_s", "docker_create_p95_s", "pool_acquire_p50_s", "creates_per_s",
    "exec_roundtrip_p50_s", "raw_exec_roundtrip_p50_s", "ratio_exec_to_raw", "local_create_p50_s",
)


@pytest.fixture(scope="module")
def docker_url() -> str:
    from megaflow.sandbox.dockerd import ensure_dockerd
    from megaflow.sandbox.images import build_base

    data_dir = os.environ.get("MEGAFLOW_DOCKERD_DIR", os.path.join(tempfile.gettempdir(), "megaflow-dockerd"))
    try:
        url = ensure_dockerd(data_dir)
    except SandboxError as exc:
        need("a Docker engine", False, str(exc))
    client = docker.DockerClient(base_url=url)
    try:
        build_base(client)
    except SandboxError as exc:
        need("the megaflow/base image", False, str(exc))
    finally:
        client.close()
    return url


def test_percentile() -> None:
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 100) == 5.0
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)


@pytest.mark.integration
def test_bench_env_json(docker_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from megaflow.cli.main import app

    run_id = "test-" + os.urandom(4).hex()
    monkeypatch.setenv("DOCKER_HOST", docker_url)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the local backend's data dir goes here
    monkeypatch.setattr(env_bench, "new_run_id", lambda: run_id)
    result = CliRunner().invoke(app, ["bench", "env", "--n", "5", "--json"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    figures = json.loads(result.stdout.strip().splitlines()[-1])

    assert set(figures) == {*FIGURES, "create_errors", "create_threads", "n", "targets"}
    assert figures["n"] == 5 and figures["create_threads"] == env_bench.THREADS
    for key in FIGURES:
        assert isinstance(figures[key], (int, float)) and figures[key] > 0, (key, figures[key])
    assert figures["create_errors"] == 0
    assert figures["docker_create_p50_s"] <= figures["docker_create_p95_s"] < 60
    assert figures["exec_roundtrip_p50_s"] < 10 and figures["raw_exec_roundtrip_p50_s"] < 10
    ratio = figures["exec_roundtrip_p50_s"] / figures["raw_exec_roundtrip_p50_s"]
    assert figures["ratio_exec_to_raw"] == pytest.approx(ratio, rel=0.01)
    assert figures["targets"] == {"pool_acquire_p50_s_max": 0.02, "docker_create_p50_s_max": 0.5,
                                  "creates_per_s_min": 10.0, "ratio_exec_to_raw_max": 1.2}
    assert len(format_figures(figures)) == len(FIGURES)

    client = docker.DockerClient(base_url=docker_url)
    try:
        assert client.containers.list(all=True, filters={"label": f"{RUN_LABEL}={run_id}"}) == []
    finally:
        client.close()
    assert not list(tmp_path.glob("megaflow-bench-env-*")), "local sandbox data dir left behind"
