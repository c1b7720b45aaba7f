"""Clear errors, installable tools (issue #15, point 5).

`megaflow env validate` shows the command, exit code and output tail of a failed
check and uses a run's sandbox settings; the image contexts ship as package data,
so `env build-base` and `env build` work from the built wheel in a fresh virtualenv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import need
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "examples" / "tasks"


def _validate(args: list[str], tmp_path) -> tuple[int, str]:
    from megaflow.cli.main import app

    result = CliRunner().invoke(app, ["env", "validate", *args], env={"MEGAFLOW_DATA_DIR": str(tmp_path / "data")})
    return result.exit_code, result.output


@pytest.fixture
def bwrap():
    need("bubblewrap", shutil.which("bwrap") is not None, "apt-get install bubblewrap")


@pytest.mark.integration
def test_failed_check_shows_command_exit_code_and_output(bwrap, tmp_path):
    tasks = yaml.safe_load((TASKS / "swe.yaml").read_text())
    task = next(t for t in tasks if t["instance_id"] == "intervals-1")
    task["repo"] = str((TASKS / task["repo"]).resolve())
    task["PASS_TO_PASS"] = task["PASS_TO_PASS"] + ["tests/test_intervals.py::TestMerge::test_no_such_test"]
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump([task]))
    code, out = _validate([str(path)], tmp_path)
    assert code == 1, out
    assert "PASS_TO_PASS tests fail without any change" in out
    assert "$ python3 .megaflow_runtests.py" in out and "exit code 1" in out
    assert "ERROR tests/test_intervals.py::TestMerge::test_no_such_test" in out  # the output's tail
    assert "PASS_TO_PASS failing: tests/test_intervals.py::TestMerge::test_no_such_test" in out


@pytest.mark.integration
def test_validate_uses_the_run_specs_sandbox(bwrap, tmp_path):
    task = {"instance_id": "env-1", "instruction": "make done", "solution": ["touch done"],
            "check": 'test "$MEGAFLOW_PROBE" = from-spec && test -f done'}
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump([task]))
    spec = {"name": "probe", "tasks_file": "tasks.yaml", "agent": {"type": "oracle"},
            "sandbox": {"type": "local", "env": {"MEGAFLOW_PROBE": "from-spec"}}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(spec))
    code, out = _validate([str(tmp_path / "run.yaml")], tmp_path)
    assert code == 0 and "1 passed, 0 failed" in out, out
    code, out = _validate([str(tmp_path / "tasks.yaml"), "--spec", str(tmp_path / "run.yaml")], tmp_path)
    assert code == 0, out
    code, out = _validate([str(tmp_path / "tasks.yaml")], tmp_path)  # no spec: no such variable
    assert code == 1 and "gold solution earns 0.0" in out and "exit code 1" in out, out


def test_contexts_are_package_data():
    from megaflow.sandbox.contexts import DOCKERFILES, context_dir, shipped

    assert context_dir("python") == DOCKERFILES / "python" and [p.name for p in shipped()] == ["python"]
    assert (ROOT / "docker" / "images" / "python" / "Dockerfile").read_bytes() == (
        DOCKERFILES / "python" / "Dockerfile").read_bytes()
    with pytest.raises(FileNotFoundError):
        context_dir("nope")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh virtualenv with the built wheel installed (dependencies from this environment)."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(ROOT)], check=True, capture_output=True, timeout=600)
    [wheel] = (tmp / "dist").glob("megaflow-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # Dependencies come from this environment (appended after the venv's own site-packages,
    # whose .pth files, this project's editable install among them, are not processed).
    deps = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "celery").is_dir())
    Path(site, "zz_megaflow_deps.pth").write_text(deps + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(wheel)],
                   check=True, capture_output=True, timeout=600)
    where = subprocess.run([str(py), "-c", "import megaflow; print(megaflow.__file__)"], cwd=tmp,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert where.startswith(str(venv)), where
    return venv


def test_installed_wheel_ships_the_contexts(installed):
    out = subprocess.run([str(installed / "bin" / "python"), "-c",
                          "from megaflow.sandbox.contexts import context_dir; print(context_dir('python'))"],
                         cwd=installed, check=True, capture_output=True, text=True).stdout.strip()
    assert out.startswith(str(installed)) and Path(out, "Dockerfile").is_file()


@pytest.mark.integration
def test_installed_wheel_builds_the_images(installed, tmp_path):
    from megaflow.errors import SandboxError
    from megaflow.sandbox.dockerd import ensure_dockerd

    data_dir = os.environ.get("MEGAFLOW_DOCKERD_DIR", os.path.join(tempfile.gettempdir(), "megaflow-dockerd"))
    try:
        url = ensure_dockerd(data_dir)
    except SandboxError as exc:
        need("a Docker engine", False, str(exc))
    env = {**os.environ, "DOCKER_HOST": url, "MEGAFLOW_DATA_DIR": str(tmp_path / "data")}
    megaflow = [str(installed / "bin" / "python"), "-m", "megaflow"]
    base = subprocess.run([*megaflow, "env", "build-base"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert base.returncode == 0, base.stdout + base.stderr
    assert "megaflow/python" in base.stdout
    build = subprocess.run([*megaflow, "env", "build", str(TASKS / "swe.yaml")], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stdout + build.stderr
    assert "repo images, 0 environments ready" in build.stdout


def test_validate_names_a_missing_gold_solution_and_quotes_the_check_as_shell(tmp_path):
    """A task with no `solution` is not "gold earns 0": it says there is nothing to prove it with."""
    import shlex

    from megaflow.sandbox.base import SandboxConfig
    from megaflow.sandbox.memory import MemoryBackend
    from megaflow.spec import TerminalTask
    from megaflow.validate import validate_task

    check = "test \"$(cat n.txt)\" = \"$(printf '1\\n2')\""
    bare = TerminalTask(instance_id="bare", instruction="count", check=check)
    report = validate_task(MemoryBackend(), SandboxConfig(type="memory"), bare, tmp_path, timeout=10)
    assert report.problems == ["no gold solution to prove it with: the task gives no `solution`"], report.problems
    wrong = TerminalTask(instance_id="wrong", instruction="count", check=check, solution=["echo 3 > n.txt"])
    report = validate_task(MemoryBackend(), SandboxConfig(type="memory"), wrong, tmp_path, timeout=10)
    shown = next(p for p in report.problems if "gold solution earns 0.0" in p)
    assert f"bash -c {shlex.quote(check)}" in shown, shown  # a command a user can paste
