"""Backends checked up front: `megaflow run`/`submit` and env workers refuse, in seconds and in one line,
what cannot work on this host, and nothing is queued."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import need, run_megaflow

from megaflow.config import Settings
from megaflow.model.config import OpenAIModelConfig, ScriptedModelConfig, TransformersModelConfig
from megaflow.preflight import PreflightError, check_docker, check_local, check_model, check_spec
from megaflow.spec import RunSpec

ROOT = Path(__file__).resolve().parent.parent
DEAD_DOCKER = "tcp://127.0.0.1:1"  # nothing listens on port 1: refused at once


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _docker_spec(tmp_path: Path) -> Path:
    path = tmp_path / "hello-docker.yaml"
    path.write_text((ROOT / "examples" / "hello.yaml").read_text().replace("type: local", "type: docker"))
    return path


# -- sandboxes -------------------------------------------------------------------------


def test_local_check_names_the_package_when_bubblewrap_is_missing(tmp_path, monkeypatch):
    import megaflow.sandbox.local as local

    real = local.shutil.which
    monkeypatch.setattr(local.shutil, "which",
                        lambda name, path=None: None if name == "bwrap" else real(name, path=path))
    with pytest.raises(PreflightError) as info:
        check_local(Settings(data_dir=tmp_path))
    msg = str(info.value)
    assert "\n" not in msg and "bwrap" in msg and "apt-get install bubblewrap" in msg


@pytest.mark.integration
def test_local_check_passes_and_leaves_no_sandbox(tmp_path):
    need("bubblewrap", shutil.which("bwrap") is not None)
    check_local(Settings(data_dir=tmp_path))
    assert [p.name for p in (tmp_path / "sandboxes").iterdir() if not p.name.startswith(".")] == []


def test_docker_check_fails_fast_without_an_engine(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", DEAD_DOCKER)
    start = time.monotonic()
    with pytest.raises(PreflightError, match="does not answer.*start-dockerd.sh"):
        check_docker(["megaflow/base"])
    assert time.monotonic() - start < 5
    monkeypatch.setenv("DOCKER_HOST", f"unix://{Path('/nonexistent/docker.sock')}")
    with pytest.raises(PreflightError, match="no Docker engine at unix:///nonexistent"):
        check_docker()


@pytest.mark.integration
def test_docker_check_names_a_missing_image_and_how_to_build_it():
    from megaflow.sandbox.dockerd import daemon_answers

    url = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    need("a Docker engine", daemon_answers(url), url)
    with pytest.raises(PreflightError, match=r"image megaflow/repo-none:0 not on the engine.*env build SPEC"):
        check_docker(["megaflow/base", "megaflow/repo-none:0"])


def test_a_missing_image_is_named_with_how_to_build_it():
    from megaflow.preflight import _how_to_build

    assert _how_to_build(["megaflow/base"]) == "build it with `megaflow env build-base`"
    assert _how_to_build(["megaflow/python:latest"]) == "build it with `megaflow env build-base`"
    assert "`megaflow env build SPEC`" in _how_to_build(["megaflow/repo-tiny:abc"])
    assert "never pulled" in _how_to_build(["megaflow/python:v9", "ubuntu"])


# -- models ----------------------------------------------------------------------------


def test_scripted_model_always_passes():
    check_model(ScriptedModelConfig())


def test_transformers_check_wants_weights_that_exist(tmp_path):
    with pytest.raises(PreflightError, match="no weights at"):
        check_model(TransformersModelConfig(model=str(tmp_path / "nothing-here")))


def test_openai_check_wants_an_endpoint_that_answers(monkeypatch):
    port = _closed_port()
    start = time.monotonic()
    with pytest.raises(PreflightError, match=f"endpoint http://127.0.0.1:{port}/v1 does not answer"):
        check_model(OpenAIModelConfig(model="m", endpoints=[f"http://127.0.0.1:{port}/v1"]))
    assert time.monotonic() - start < 5

    class Any404(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Any404)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        check_model(OpenAIModelConfig(model="m", endpoints=[url]))  # a server answers: enough
        monkeypatch.delenv("MF_TEST_NO_KEY", raising=False)
        with pytest.raises(PreflightError, match="MF_TEST_NO_KEY, which is not set"):
            check_model(OpenAIModelConfig(model="m", endpoints=[url], api_key_env="MF_TEST_NO_KEY"))
    finally:
        server.shutdown()


def test_a_cluster_client_checks_only_what_does_not_depend_on_the_host(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", DEAD_DOCKER)
    spec = RunSpec.load(_docker_spec(tmp_path))
    check_spec(spec, Settings(data_dir=tmp_path), sandbox=False, model=False)  # env hosts are elsewhere
    with pytest.raises(PreflightError):
        check_spec(spec, Settings(data_dir=tmp_path))


# -- the commands ----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "submit"])
def test_a_run_that_cannot_work_is_refused_in_one_line_and_nothing_is_queued(tmp_path, command):
    data = tmp_path / "data"
    start = time.monotonic()
    proc = run_megaflow([command, str(_docker_spec(tmp_path))], data, timeout=60,
                        extra_env={"DOCKER_HOST": DEAD_DOCKER})
    assert time.monotonic() - start < 20
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cannot run, nothing queued: sandbox.type docker"), lines
    assert not data.exists(), "nothing may be recorded or queued"


@pytest.mark.parametrize("pool, variable, value, reason", [
    ("env", "MEGAFLOW_SANDBOX_BACKENDS", "docker", "sandbox.type docker: the Docker engine at"),
    ("model", "MEGAFLOW_MODEL_BACKENDS", "scripted,llama", "MEGAFLOW_MODEL_BACKENDS names 'llama'"),
])
def test_a_worker_that_cannot_work_exits_at_start_with_the_reason(tmp_path, pool, variable, value, reason):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEGAFLOW_")}
    env.update({"MEGAFLOW_DATA_DIR": str(tmp_path), variable: value, "DOCKER_HOST": DEAD_DOCKER,
                "PYTHONPATH": str(ROOT)})
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "megaflow", "worker", pool], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"megaflow {pool} worker cannot start: {reason}" in proc.stderr


def test_model_worker_start_check_wants_the_packages():
    from megaflow.preflight import check_model_types

    check_model_types(["scripted", "openai"])
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(PreflightError, match="package vllm not installed"):
            check_model_types(["vllm"])


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_provision_that_fails_later_ends_infra_failed_with_the_reason_shown(tmp_path):
    """Unchecked (--no-check), the engine missing: each provision is retried, every retry is recorded with its
    error, and the episodes end infra_failed with the reason, in the live view and under the results."""
    from sqlalchemy import func, select

    from megaflow.db.engine import session_scope
    from megaflow.db.models import Event

    data = tmp_path / "data"
    proc = run_megaflow(["run", str(_docker_spec(tmp_path)), "--no-check", "--timeout", "180"], data, timeout=220,
                        extra_env={"DOCKER_HOST": DEAD_DOCKER})
    out = " ".join(proc.stdout.split())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "infra_failed=6" in out and "failures: provision_failed=6 | last error: " in out, out[-3000:]
    assert "6 × provision_failed: SandboxError: docker engine failed" in out, out[-3000:]
    with session_scope(Settings(data_dir=data).resolved_database_url()) as s:
        retries = s.execute(select(func.count()).where(Event.kind == "hop.retry")).scalar()
    assert retries >= 6, "every provision is retried before it fails, and each retry is recorded"


def test_resume_checks_the_runs_backends_first(tmp_path):
    from megaflow import Client
    from megaflow.db.schema import upgrade

    settings = Settings(data_dir=tmp_path / "data")
    settings.data_dir.mkdir()
    upgrade(settings.resolved_database_url())
    run_id = Client(settings).submit(RunSpec.load(_docker_spec(tmp_path)))
    proc = run_megaflow(["resume", run_id], settings.data_dir, timeout=60, extra_env={"DOCKER_HOST": DEAD_DOCKER})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.startswith("cannot run, nothing queued: sandbox.type docker"), proc.stdout
    proc = run_megaflow(["resume", "nosuchrun"], settings.data_dir, timeout=60)
    assert proc.returncode == 1 and "no run nosuchrun" in proc.stdout
