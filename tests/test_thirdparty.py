"""Proof on code nobody here wrote (issue #15, point 6), a subset for CI.

`examples/thirdparty/build_tasks.py` builds tasks from real PyPI packages and their
own test suites (fetched with pip: needs the package registry); `megaflow run`
then gives the oracle 1 and the no-op and every tamper agent 0 on each instance,
on the local backend here and on docker in the integration test. With restoration
switched off the tamper agents do game these suites, so the 0s mean something.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import need, run_megaflow

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ["inflection", "parse"]


def _module():
    spec = importlib.util.spec_from_file_location("build_tasks", ROOT / "examples" / "thirdparty" / "build_tasks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("thirdparty")
    module = _module()
    try:
        tasks = module.build(out, SUBSET)
    except subprocess.CalledProcessError as exc:  # pip could not reach the registry
        need("the package registry (pip download)", False, (exc.stderr or b"")[-300:])
    return out, tasks, module


@pytest.mark.integration
def test_tasks_come_from_the_packages_own_suites(built):
    out, tasks, module = built
    assert [t["instance_id"] for t in tasks] == ["inflection-0.5.1-bug1", "parse-1.20.1-bug1"]
    for t in tasks:
        assert t["FAIL_TO_PASS"] and len(t["PASS_TO_PASS"]) > 50 and t["patch"].startswith("diff --git a/")
        assert all(i.count("[") == i.count("]") for i in t["FAIL_TO_PASS"] + t["PASS_TO_PASS"])
    assert {p.name for p in module.PACKAGES} & {"pytest", "celery", "pydantic", "swebench"} == set()
    assert len(module.PACKAGES) >= 6 and json.loads((out / "manifest.json").read_text()) == {
        "inflection": "0.5.1", "parse": "1.20.1"}


def _mean_reward(out: Path, agent: str, sandbox: str, data: Path, env: dict | None = None) -> tuple[float, dict]:
    spec = (out / f"run-{agent}.yaml").read_text().replace("type: docker", f"type: {sandbox}")
    path = out / f"run-{agent}-{sandbox}.yaml"
    path.write_text(spec)
    proc = run_megaflow(["run", str(path), "--timeout", "500"], data, timeout=600, extra_env=env)
    m = re.search(r"run ([0-9a-f]{32}) finished", proc.stdout)
    assert proc.returncode == 0 and m, proc.stdout[-2000:] + proc.stderr[-2000:]
    # The run's summary as recorded in its state database (what `megaflow status` reads).
    from megaflow import Client, Settings

    summary = Client(Settings(data_dir=data)).status(m.group(1))["summary"]
    return summary["mean_reward"], summary


AGENTS = ["oracle", "noop", "neuter", "conftest", "ini"]


@pytest.mark.integration
def test_megaflow_run_on_local(built, tmp_path):
    need("bubblewrap", shutil.which("bwrap") is not None, "apt-get install bubblewrap")
    out, tasks, _ = built
    for agent in AGENTS:
        mean, summary = _mean_reward(out, agent, "local", tmp_path / "data")
        assert summary["by_state"] == {"succeeded": len(tasks)}, (agent, summary)
        assert mean == (1.0 if agent == "oracle" else 0.0), (agent, summary)


@pytest.mark.integration
def test_tamper_agents_game_these_suites_without_restoration(built, tmp_path, monkeypatch):
    """The same agents against the same tasks with restoration off: they win, so the 0s above are earned."""
    import swe_tamper

    from megaflow.envs import grading
    from megaflow.validate import load_task_set
    from megaflow.envs.prepare import setup
    from megaflow.sandbox.base import SandboxConfig
    from megaflow.sandbox.local import LocalBackend
    from megaflow.envs.swe import sandbox_config

    need("bubblewrap", shutil.which("bwrap") is not None, "apt-get install bubblewrap")
    out, _, module = built
    monkeypatch.setenv("MEGAFLOW_DATA_DIR", str(tmp_path / "data"))
    swe_tamper.restoration_off(monkeypatch)
    backend = LocalBackend(tmp_path / "sb")
    for task in load_task_set(out / "tasks.yaml"):
        config = sandbox_config(SandboxConfig(type="local"), task)
        for agent in ("neuter", "conftest", "ini"):
            sb = backend.create(config, {"megaflow.test": "thirdparty"})
            try:
                setup(sb, task, 600, config=config, cache_root=tmp_path)
                for cmd in module.AGENTS[agent]:
                    assert sb.exec(cmd, timeout=60).exit_code == 0
                assert grading.evaluate(sb, task, 600).reward == 1.0, (task.instance_id, agent)
            finally:
                sb.close()


@pytest.mark.integration
def test_megaflow_run_on_docker(built, tmp_path):
    from megaflow.errors import SandboxError
    from megaflow.sandbox.dockerd import ensure_dockerd

    out, tasks, _ = built
    try:
        url = ensure_dockerd(os.environ.get("MEGAFLOW_DOCKERD_DIR",
                                            os.path.join(tempfile.gettempdir(), "megaflow-dockerd")))
    except SandboxError as exc:
        need("a Docker engine", False, str(exc))
    wheels = tmp_path / "wheels"  # the image build gets pytest from a wheelhouse (offline-host path)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels), "pytest"], check=True,
                   capture_output=True, timeout=600)
    env = {"DOCKER_HOST": url}
    build = run_megaflow(["env", "build", str(out / "tasks.yaml"), "--find-links", str(wheels)], tmp_path / "data",
                         timeout=1200, extra_env=env)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    for agent in AGENTS:
        mean, summary = _mean_reward(out, agent, "docker", tmp_path / "data", env)
        assert summary["by_state"] == {"succeeded": len(tasks)}, (agent, summary)
        assert mean == (1.0 if agent == "oracle" else 0.0), (agent, summary)
