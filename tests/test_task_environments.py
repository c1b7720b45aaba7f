"""Task environments as data (issue #15, point 3): one environment, built once, the same task on both backends.

The environment installs pytest from a local wheelhouse (``--find-links``, as on an
offline host; the wheels are made from this interpreter's installed pytest), so
the build needs no network and the sandboxes have none. ``python`` resolves in
both, and the task (its tests shipped in the repository) grades the same on both.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import pytest
import swe_tamper
from conftest import PARAMETRIZED_TESTS, docker_engine, need

from megaflow.envs import environments, grading
from megaflow.errors import SandboxError
from megaflow.envs.prepare import setup
from megaflow.sandbox.base import SandboxConfig
from megaflow.spec import Environment, SWETask

ROOT = Path(__file__).resolve().parents[1]
ENV = Environment(pip=["pytest"], install=["python -c 'import pytest'"])


def _wheel(dist_name: str, out: Path) -> None:
    """A pure-Python wheel of an installed distribution (what its RECORD lists)."""
    dist = importlib.metadata.distribution(dist_name)
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"]).lower()
    with zipfile.ZipFile(out / f"{name}-{dist.version}-py3-none-any.whl", "w") as zf:
        for f in dist.files:
            if str(f).startswith("..") or "__pycache__" in str(f):
                continue
            zf.write(f.locate(), str(f))


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheelhouse")
    for dist in ("pytest", "pluggy", "iniconfig", "packaging", "pygments"):
        _wheel(dist, out)
    return out


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    for rel, text in {"calc.py": swe_tamper.CALC, "tests/test_calc.py": swe_tamper.TESTS,
                      "tests/__init__.py": ""}.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    base = swe_tamper.task(tmp_path_factory.mktemp("unused"))
    return SWETask(instance_id="calc-env", problem_statement="clamp ignores hi", repo=str(repo),
                   environment=ENV, test_command="python -m pytest -rA -p no:cacheprovider",
                   FAIL_TO_PASS=base.FAIL_TO_PASS, PASS_TO_PASS=base.PASS_TO_PASS, patch=base.patch)


def _grade(backend, config, task, agent, tmp_path):
    from megaflow.envs.swe import sandbox_config

    config = sandbox_config(config, task)
    sb = backend.create(config, {"megaflow.test": "env"})
    try:
        setup(sb, task, 300, config=config, cache_root=tmp_path)
        r = sb.exec("command -v python && python -c 'import pytest; print(pytest.__version__)'", timeout=60)
        assert r.exit_code == 0, r
        for cmd in swe_tamper.AGENTS[agent]:
            assert sb.exec(cmd, timeout=60).exit_code == 0
        return grading.evaluate(sb, task, 300)
    finally:
        sb.close()


def _check(backend, config, task, tmp_path):
    results = {a: _grade(backend, config, task, a, tmp_path) for a in ("oracle", "noop", "neuter", "conftest")}
    assert {a: r.reward for a, r in results.items()} == {"oracle": 1.0, "noop": 0.0, "neuter": 0.0, "conftest": 0.0}, {
        a: (r.tests_status, (r.test_log or "")[-800:]) for a, r in results.items()}


def test_environment_hash_is_content():
    assert environments.digest(ENV) == environments.digest(Environment(pip=["pytest"], install=[
        "python -c 'import pytest'"]))
    assert environments.digest(ENV) != environments.digest(Environment(pip=["pytest==9"]))
    text = environments.dockerfile(Environment(apt=["make"], pip=["a==1"], python="3.11"), has_wheels=True)
    assert "apt-get install" in text and "python3.11 -m venv /opt/megaflow-env" in text
    assert "--no-index --find-links /tmp/megaflow-wheels a==1" in text and text.rstrip().endswith("WORKDIR /work")


@pytest.mark.parametrize("name", ["megaflow-tamper-repo-_7xmfe1n", "a._b", "x__y", "a---b", "_lead", "more-itertools-10.2.0",
                                  "Weird Name!!", "-._-"])
def test_repo_image_tags_are_valid_docker_references(name):
    from docker.utils import parse_repository_tag

    from megaflow.envs.repos import image_tag

    tag = image_tag(f"/tmp/{name}")
    repo, _ = parse_repository_tag(tag)
    # Docker's grammar for a repository path component: alphanumerics joined by ".", "_", "__" or dashes.
    assert re.fullmatch(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*", repo.split("/", 1)[1]), tag
    assert image_tag("pypi:more-itertools==10.2.0").startswith("megaflow/repo-more-itertools-10.2.0:")


def test_task_file_defaults_apply(tmp_path):
    from megaflow.spec import load_tasks

    (tmp_path / "t.yaml").write_text(
        "defaults:\n  kind: swe\n  environment: {pip: [pytest]}\n  test_command: python -m pytest -rA\n"
        "tasks:\n  - {instance_id: a, problem_statement: p}\n"
        "  - {instance_id: b, problem_statement: p, environment: {pip: [nose]}}\n")
    a, b = (SWETask.model_validate(t) for t in load_tasks(tmp_path / "t.yaml"))
    assert a.environment.pip == ["pytest"] and b.environment.pip == ["nose"] and a.test_command.startswith("python ")


@pytest.mark.integration
def test_same_task_on_local(task, wheels, tmp_path, monkeypatch):
    from megaflow.sandbox.local import LocalBackend

    need("bubblewrap", shutil.which("bwrap") is not None, "apt-get install bubblewrap")
    monkeypatch.setenv("MEGAFLOW_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MEGAFLOW_WHEELHOUSE", str(wheels))
    _check(LocalBackend(tmp_path / "sb"), SandboxConfig(type="local"), task, tmp_path)
    built = environments.venv_dir(ENV, tmp_path / "data")
    assert (built / ".megaflow-ready").exists()
    mtime = (built / ".megaflow-ready").stat().st_mtime
    environments.ensure_venv(ENV, tmp_path / "data")  # built once
    assert (built / ".megaflow-ready").stat().st_mtime == mtime


@pytest.mark.integration
def test_same_task_on_docker(task, wheels, tmp_path):
    from megaflow.envs.repos import build_repo_image, image_tag
    from megaflow.sandbox.contexts import context_dir
    from megaflow.sandbox.docker import DockerBackend
    from megaflow.sandbox.dockerd import ensure_dockerd
    from megaflow.sandbox.images import build_base, build_image

    data_dir = os.environ.get("MEGAFLOW_DOCKERD_DIR", os.path.join(tempfile.gettempdir(), "megaflow-dockerd"))
    try:
        import docker

        client = docker.DockerClient(base_url=ensure_dockerd(data_dir))
        build_base(client)
        build_image(client, context_dir("python"), "megaflow/python")
    except SandboxError as exc:
        need("a Docker engine with megaflow/base and megaflow/python", False, str(exc))
    assert build_repo_image(client, task.repo, tmp_path, env=ENV, find_links=wheels) == image_tag(task.repo, ENV)
    try:
        _check(DockerBackend(client), SandboxConfig(type="docker", memory_mb=512), task, tmp_path)
    finally:
        client.close()


@pytest.mark.integration
def test_python_resolves_in_local_sandbox(tmp_path):
    from megaflow.sandbox.local import LocalBackend

    need("bubblewrap", shutil.which("bwrap") is not None, "apt-get install bubblewrap")
    sb = LocalBackend(tmp_path / "sb").create(SandboxConfig(type="local"), {"megaflow.test": "python"})
    try:
        r = sb.exec("python --version", timeout=60)
        assert r.exit_code == 0 and "Python 3" in r.stdout + r.stderr, r
    finally:
        sb.close()


@pytest.mark.integration
def test_python_resolves_in_megaflow_base(monkeypatch):
    import docker

    client = docker.DockerClient(base_url=docker_engine(monkeypatch))
    try:
        out = client.containers.run("megaflow/base", ["python", "--version"], remove=True, network_mode="none")
    finally:
        client.close()
    assert out.decode().startswith("Python 3")


@pytest.mark.integration
def test_parametrized_ids_graded_through_pytest(wheels, tmp_path, tmp_path_factory, monkeypatch):
    from megaflow.sandbox.local import LocalBackend

    need("bubblewrap", shutil.which("bwrap") is not None, "apt-get install bubblewrap")
    monkeypatch.setenv("MEGAFLOW_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MEGAFLOW_WHEELHOUSE", str(wheels))
    repo = tmp_path_factory.mktemp("param-repo")
    (repo / "tests").mkdir()
    (repo / "tests" / "test_p.py").write_text(PARAMETRIZED_TESTS)
    rewards = {}
    for case in ("1-2", "2-2"):  # the default test_command: the runner, which is pytest here
        task = SWETask(instance_id=f"param-{case}", problem_statement="p", repo=str(repo), environment=ENV,
                       FAIL_TO_PASS=[f"tests/test_p.py::test_lt[{case}]"], PASS_TO_PASS=["tests/test_p.py::test_plain"])
        result = _grade(LocalBackend(tmp_path / "sb"), SandboxConfig(type="local"), task, "noop", tmp_path)
        rewards[case] = (result.reward, result.statuses)
    assert rewards["1-2"][0] == 1.0 and rewards["2-2"][0] == 0.0, rewards
