"""The example task set proves itself: gold → reward 1, no change → reward 0, on local and docker.

Also the evaluation's guarantees an agent could try to get around, and the CLI.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import need
from typer.testing import CliRunner

from megaflow.envs import grading, swe
from megaflow.envs.repos import RepoSource, image_tag
from megaflow.validate import load_task_set, validate
from megaflow.errors import SandboxError
from megaflow.sandbox.base import SandboxConfig
from megaflow.sandbox.local import LocalBackend

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TASKS = EXAMPLES / "tasks"


@pytest.fixture(scope="module")
def tasks():
    return load_task_set(TASKS)


@pytest.fixture
def local(tmp_path):
    need("bubblewrap", shutil.which("bwrap") is not None, "apt-get install bubblewrap")
    return LocalBackend(tmp_path)


def test_example_set_shape(tasks):
    swe_tasks = [t for t in tasks if t.kind == "swe"]
    assert len(swe_tasks) >= 10 and len(tasks) > len(swe_tasks)
    for t in swe_tasks:
        assert t.patch and t.test_patch and t.FAIL_TO_PASS and t.PASS_TO_PASS
        assert t.files or Path(t.repo).is_dir(), "repo paths are resolved against the tasks file"


@pytest.mark.integration
def test_examples_validate_on_local(tasks, local, tmp_path):
    reports = validate(tasks, local, SandboxConfig(type="local"), tmp_path, timeout=60)
    assert [r.instance_id for r in reports if not r.ok] == [], [(r.instance_id, r.problems) for r in reports]
    assert local.list_ids({}) == []


@pytest.mark.integration
def test_examples_validate_on_docker(tasks, tmp_path, monkeypatch):
    from megaflow.envs.repos import build_repo_image
    from megaflow.sandbox.docker import DockerBackend
    from megaflow.sandbox.dockerd import ensure_dockerd
    from megaflow.sandbox.images import build_base, build_image

    data_dir = os.environ.get("MEGAFLOW_DOCKERD_DIR", os.path.join(tempfile.gettempdir(), "megaflow-dockerd"))
    try:
        url = ensure_dockerd(data_dir)
        import docker

        client = docker.DockerClient(base_url=url)
        build_base(client)
        build_image(client, EXAMPLES.parent / "docker" / "images" / "python", "megaflow/python")
    except SandboxError as exc:
        need("a Docker engine with megaflow/base and megaflow/python", False, str(exc))
    for source in sorted({t.repo for t in tasks if t.kind == "swe" and t.repo}):
        assert build_repo_image(client, source, tmp_path) == image_tag(source)
    backend = DockerBackend(client)
    reports = validate(tasks, backend, SandboxConfig(type="docker", memory_mb=512), tmp_path, timeout=60)
    assert [r.instance_id for r in reports if not r.ok] == [], [(r.instance_id, r.problems) for r in reports]
    assert backend.list_ids({"megaflow.validate": "1"}) == []
    client.close()


def _prepared(local, tmp_path, task):
    config = SandboxConfig(type="local")
    sb = local.create(config, {"t": "1"})
    swe.prepare(sb, task, config, tmp_path, timeout=60)
    return sb


@pytest.mark.integration
def test_agent_cannot_pass_by_editing_the_tests(tasks, local, tmp_path):
    task = next(t for t in tasks if t.instance_id == "textkit-1")
    sb = _prepared(local, tmp_path, task)
    try:
        # Rewrite the test file so that every test id would pass trivially.
        names = [i.split("::")[1] for i in task.FAIL_TO_PASS + task.PASS_TO_PASS]
        sb.write_file("tests/test_textkit.py", "".join(f"def {n}():\n    pass\n" for n in names).encode())
        graded = grading.evaluate(sb, task, timeout=60)
        reward, patch = graded.reward, graded.patch
        assert reward == 0.0 and "tests/test_textkit.py" in patch
    finally:
        sb.close()


@pytest.mark.integration
def test_partial_fix_earns_nothing(tasks, local, tmp_path):
    task = next(t for t in tasks if t.instance_id == "textkit-1")
    sb = _prepared(local, tmp_path, task)
    try:
        # Collapses runs of separators but leaves dashes at the edges: one FAIL_TO_PASS test still fails.
        r = sb.exec("sed -i 's/\\[^a-z0-9\\]\"/[^a-z0-9]+\"/' textkit/__init__.py && grep -c '+\"' textkit/__init__.py")
        assert r.stdout.strip() == "1", r
        reward = grading.evaluate(sb, task, timeout=60).reward
        assert reward == 0.0
        assert sb.exec(swe.tests_command(task, task.FAIL_TO_PASS[:1])).exit_code == 0
    finally:
        sb.close()


@pytest.mark.integration
def test_runner_reports_unknown_ids(tasks, local, tmp_path):
    task = next(t for t in tasks if t.instance_id == "intervals-1")
    sb = _prepared(local, tmp_path, task)
    try:
        assert sb.exec(swe.runner_command(sb, task)).exit_code == 0
        r = sb.exec(swe.tests_command(task, ["tests/test_intervals.py::TestMerge::test_nope"]))
        assert r.exit_code == 1 and "ERROR" in r.stdout and "0 passed, 1 failed" in r.stdout
        r = sb.exec(swe.tests_command(task, ["tests/test_intervals.py"]))  # a whole file
        assert r.exit_code == 0 and "4 passed, 0 failed" in r.stdout, r.stdout
    finally:
        sb.close()


def test_repo_sources():
    assert RepoSource.parse("pypi:six==1.16.0") == RepoSource("pypi", "six==1.16.0")
    assert RepoSource.parse("https://github.com/a/b.git#v1") == RepoSource("git", "https://github.com/a/b.git", "v1")
    assert RepoSource.parse("git+file:///srv/x").kind == "git"
    assert RepoSource.parse("../repos/x").kind == "dir"
    with pytest.raises(ValueError):
        RepoSource.parse("pypi:six")
    assert image_tag("pypi:six==1.16.0").startswith("megaflow/repo-six-1.16.0:")
    docker_config = swe.sandbox_config(SandboxConfig(type="docker"), load_task_set(TASKS)[0])
    assert docker_config.image == image_tag(load_task_set(TASKS)[0].repo)


@pytest.mark.integration
def test_git_source_is_fetched_and_copied(local, tmp_path):
    import subprocess

    src = tmp_path / "upstream"
    src.mkdir()
    (src / "mod.py").write_text("X = 1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=src, check=True)
    subprocess.run([*git, "add", "-A"], cwd=src, check=True)
    subprocess.run([*git, "commit", "-qm", "one"], cwd=src, check=True)
    from megaflow.spec import SWETask

    task = SWETask(instance_id="g", problem_statement="p", repo=f"file://{src}", test_command="true")
    sb = _prepared(local, tmp_path / "cache", task)
    try:
        assert sb.read_file("mod.py") == b"X = 1\n"
        assert sb.exec("git status --porcelain && git log --oneline | wc -l").stdout.strip() == "1"
    finally:
        sb.close()


@pytest.mark.integration
def test_cli_validate(tmp_path, monkeypatch):
    need("bubblewrap", shutil.which("bwrap") is not None)
    from megaflow.cli.main import app

    monkeypatch.setenv("MEGAFLOW_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["env", "validate", str(TASKS / "terminal.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    assert "4 passed, 0 failed" in result.output
