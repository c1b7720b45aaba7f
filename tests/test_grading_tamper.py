"""Tamper-proof grading (issue #15, point 1): scripted agents that game the tests earn 0, on both backends.

The task ships its tests in the repository (empty ``test_patch``), as the issue's
instances did, and runs real pytest (`swe_tamper`). Each agent's commands run in a
sandbox prepared by the same `setup` the env hops use; the reward comes from the
same `evaluate`. Every tamper agent earns 1 once restoration is switched off, so
these tests fail if restoration breaks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import swe_tamper
from conftest import need

from megaflow.envs import grading, pristine
from megaflow.errors import SandboxError
from megaflow.envs.prepare import setup
from megaflow.sandbox.base import SandboxConfig

ROOT = Path(__file__).resolve().parents[1]
TASK = swe_tamper.task(Path(tempfile.mkdtemp(prefix="megaflow-tamper-repo-")))


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    from megaflow.sandbox.local import LocalBackend

    need("bubblewrap", shutil.which("bwrap") is not None, "apt-get install bubblewrap")
    return LocalBackend(tmp_path_factory.mktemp("sandboxes")), SandboxConfig(type="local")


@pytest.fixture(scope="module")
def docker_backend():
    from megaflow.sandbox.docker import DockerBackend
    from megaflow.sandbox.dockerd import ensure_dockerd
    from megaflow.sandbox.images import build_base, build_image

    data_dir = os.environ.get("MEGAFLOW_DOCKERD_DIR", os.path.join(tempfile.gettempdir(), "megaflow-dockerd"))
    try:
        import docker

        client = docker.DockerClient(base_url=ensure_dockerd(data_dir))
        build_base(client)
        build_image(client, ROOT / "docker" / "images" / "python", "megaflow/python")
    except SandboxError as exc:
        need("a Docker engine with megaflow/base and megaflow/python", False, str(exc))
    from megaflow.envs.repos import build_repo_image
    from megaflow.envs.swe import sandbox_config

    build_repo_image(client, TASK.repo, Path(data_dir))
    yield DockerBackend(client), sandbox_config(SandboxConfig(type="docker", memory_mb=512), TASK)
    client.close()


def run_agent(backend, config, agent: str, tmp_path) -> grading.Evaluation:
    sb = backend.create(config, {"megaflow.test": "tamper"})
    try:
        setup(sb, TASK, 120, config=config, cache_root=tmp_path)
        for cmd in swe_tamper.AGENTS[agent]:
            r = sb.exec(cmd, timeout=60)
            assert r.exit_code == 0, (agent, cmd, r)
        return grading.evaluate(sb, TASK, 120)
    finally:
        sb.close()


def _check(backend_config, tmp_path):
    backend, config = backend_config
    results = {agent: run_agent(backend, config, agent, tmp_path) for agent in swe_tamper.AGENTS}
    rewards = {agent: r.reward for agent, r in results.items()}
    assert rewards == {agent: (1.0 if agent == "oracle" else 0.0) for agent in swe_tamper.AGENTS}, {
        a: (r.reward, r.tests_status, r.error, (r.test_log or "")[-1500:]) for a, r in results.items()}
    oracle = results["oracle"]
    assert oracle.resolved and oracle.patch_applied and "calc.py" in oracle.patch
    assert oracle.tests_status["FAIL_TO_PASS"] == {"success": TASK.FAIL_TO_PASS, "failure": []}
    assert oracle.statuses["tests/test_calc.py::test_clamp_high"] == "PASSED"
    noop = results["noop"]
    assert noop.tests_status["FAIL_TO_PASS"]["failure"] == TASK.FAIL_TO_PASS
    assert noop.statuses["tests/test_calc.py::test_clamp_high"] == "FAILED" and "assert" in noop.test_log
    # A committed change still counts as the agent's patch (diffed against the baseline, not HEAD).
    assert "tests/test_calc.py" in results["neuter_commit"].patch


def _unprotected(backend_config, tmp_path, monkeypatch):
    """Without restoration every tamper agent games the reward: the tests above can fail."""
    swe_tamper.restoration_off(monkeypatch)
    backend, config = backend_config
    gamed = {agent: run_agent(backend, config, agent, tmp_path).reward for agent in swe_tamper.TAMPER}
    assert gamed == {agent: 1.0 for agent in swe_tamper.TAMPER}


@pytest.mark.integration
def test_tamper_agents_earn_nothing_on_local(local, tmp_path):
    _check(local, tmp_path)


@pytest.mark.integration
def test_tamper_agents_win_without_restoration_on_local(local, tmp_path, monkeypatch):
    _unprotected(local, tmp_path, monkeypatch)


@pytest.mark.integration
def test_tamper_agents_earn_nothing_on_docker(docker_backend, tmp_path):
    _check(docker_backend, tmp_path)


@pytest.mark.integration
def test_tamper_agents_win_without_restoration_on_docker(docker_backend, tmp_path, monkeypatch):
    _unprotected(docker_backend, tmp_path, monkeypatch)


@pytest.mark.integration
def test_deleted_baseline_earns_nothing(local, tmp_path):
    backend, config = local
    sb = backend.create(config, {"megaflow.test": "tamper"})
    try:
        setup(sb, TASK, 120, config=config, cache_root=tmp_path)
        sb.exec(f"git update-ref -d {pristine.BASE_REF}")
        result = grading.evaluate(sb, TASK, 120)
        assert result.reward == 0.0 and "missing" in result.error
    finally:
        sb.close()


def test_merge_pyproject_keeps_other_edits():
    pristine_text = '[project]\nname = "x"\n\n[tool.pytest.ini_options]\naddopts = "-q"\n'
    current = ('[project]\nname = "x"\ndependencies = ["y"]\n\n[tool.pytest.ini_options]\naddopts = "-p evil"\n'
               '[tool.pytest.more]\nx = 1\n[tool.black]\nline-length = 9\n')
    merged = pristine.merge_pyproject(pristine_text, current)
    assert 'dependencies = ["y"]' in merged and "line-length = 9" in merged
    assert "evil" not in merged and "tool.pytest.more" not in merged and 'addopts = "-q"' in merged


def test_protected_paths_cover_tests_and_config():
    whole, pyprojects = pristine.protected_paths(TASK)
    assert {"tests/test_calc.py", "pytest.ini", "tests/pytest.ini", "setup.cfg", "tox.ini",
            swe_tamper.VENDOR} <= set(whole)
    assert pyprojects == ["pyproject.toml", "tests/pyproject.toml"]
    assert pristine.shadowing(["pytest.py", "unittest", "mymod.py", "sitecustomize.py", "json"]) == [
        "pytest.py", "unittest", "sitecustomize.py", "json"]


def test_shadowing_names_are_removed_in_the_sandbox_as_shadowing_says(tmp_path):
    """The restore removes, in the sandbox's shell, exactly the added root names `shadowing` names."""
    import subprocess

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "json.py").write_text("# the repository's own json.py: not added, stays\n")
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "base"], cwd=tmp_path, check=True)
    subprocess.run([*git, "update-ref", pristine.BASE_REF, "HEAD"], cwd=tmp_path, check=True)
    added = ["pytest.py", "unittest", "mymod.py", "sitecustomize.py", "json", "reproduce.py", "typing.pyi",
             "a b.py", "ast asyncio", "conftest.txt", "_pytest", "os.py"]
    for name in added:
        (tmp_path / name).write_text("x\n") if "." in name or " " in name else (tmp_path / name).mkdir()
    subprocess.run(["bash", "-c", pristine.shadow_removal_command()], cwd=tmp_path, check=True)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != ".git")
    assert left == sorted({*added, "json.py"} - set(pristine.shadowing(added)))
    assert "reproduce.py" in left and "pytest.py" not in left and "ast asyncio" in left


class _Counting:
    """A sandbox that counts its round trips."""

    def __init__(self, sb):
        self.sb, self.execs, self.reads = sb, 0, 0

    def exec(self, cmd, timeout=60.0):
        self.execs += 1
        return self.sb.exec(cmd, timeout=timeout)

    def read_file(self, path):
        self.reads += 1
        return self.sb.read_file(path)

    def write_file(self, path, data):
        return self.sb.write_file(path, data)


def _graded(local, tmp_path, agent: str, task=TASK, timeout: float = 120):
    backend, config = local
    sb = backend.create(config, {"megaflow.test": "tamper"})
    try:
        setup(sb, task, 120, config=config, cache_root=tmp_path)
        for cmd in swe_tamper.AGENTS[agent]:
            assert sb.exec(cmd, timeout=60).exit_code == 0
        counting = _Counting(sb)
        return grading.evaluate(counting, task, timeout), counting
    finally:
        sb.close()


@pytest.mark.integration
def test_evaluation_takes_one_round_trip_unless_a_pyproject_changed(local, tmp_path, monkeypatch):
    result, sb = _graded(local, tmp_path, "oracle")
    assert result.reward == 1.0 and (sb.execs, sb.reads) == (1, 0)
    assert "calc.py" in result.patch and "PASSED tests/test_calc.py::test_clamp_high" in result.test_log
    result, sb = _graded(local, tmp_path, "pyproject")  # its test tables put back first: a second exec
    assert result.reward == 0.0 and sb.execs == 2 and "tool.pytest" in result.patch
    # A log too large to come back inline is read back whole, and grades the same.
    monkeypatch.setattr(grading, "INLINE_LOG_BYTES", 10)
    result, sb = _graded(local, tmp_path, "oracle")
    assert result.reward == 1.0 and (sb.execs, sb.reads) == (1, 1)


@pytest.mark.integration
def test_a_test_command_that_exits_or_hangs_keeps_the_patch(local, tmp_path):
    exits = TASK.model_copy(update={"test_command": f"{TASK.test_command} >/dev/null; exit 7; :"})
    result, _ = _graded(local, tmp_path, "oracle", exits)
    assert result.exit_code == 7 and "calc.py" in result.patch and result.reward == 0.0
    hangs = TASK.model_copy(update={"test_command": "sleep 60; :"})
    result, _ = _graded(local, tmp_path, "oracle", hangs, timeout=5)
    assert result.reward == 0.0 and result.error == "the tests timed out" and "calc.py" in result.patch


@pytest.mark.integration
def test_a_process_left_running_wins_on_docker_unless_the_restore_kills_it(docker_backend, tmp_path, monkeypatch):
    """The ``background`` agent's loop outlives its command on docker: only the restore's kill stops it."""
    monkeypatch.setattr(pristine, "_KILL_STRAYS", "true")
    assert run_agent(*docker_backend, "background", tmp_path).reward == 1.0
