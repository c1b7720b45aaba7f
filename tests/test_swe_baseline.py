"""The SWE baseline commit folded into the first command's exec (issue #15, point 7)."""

from __future__ import annotations

import shutil

import pytest
from conftest import need

from megaflow.envs import swe
from megaflow.envs.pristine import BASE_REF
from megaflow.sandbox.base import SandboxConfig
from megaflow.spec import SWETask

TASK = SWETask(instance_id="b-1", problem_statement="p", files={"a.py": "x = 1\n"}, test_command="true")


@pytest.fixture
def sandbox(tmp_path):
    from megaflow.sandbox.local import LocalBackend

    need("bubblewrap", shutil.which("bwrap") is not None, "apt-get install bubblewrap")
    config = SandboxConfig(type="local")
    sb = LocalBackend(tmp_path).create(config, {"megaflow.test": "baseline"})
    yield sb, config, tmp_path
    sb.close()


@pytest.mark.integration
def test_the_baseline_runs_ahead_of_the_command_in_one_exec(sandbox):
    sb, config, tmp = sandbox
    baseline = swe.prepare(sb, TASK, config, tmp, 60, defer_baseline=True)
    assert baseline == swe.BASELINE
    assert sb.exec(f"git rev-parse -q --verify {BASE_REF}").exit_code != 0  # not run yet
    shell, mark = swe.with_baseline(baseline, "echo the command; exit 4")
    result = sb.exec(shell)
    assert swe.baseline_failed(result, mark) is None
    assert (result.stdout, result.exit_code) == ("the command\n", 4)  # the baseline's output kept apart
    assert sb.exec(f"git rev-parse -q --verify {BASE_REF} && git status --porcelain").stdout.count("\n") == 1


@pytest.mark.integration
def test_a_failing_baseline_stops_before_the_command_and_says_why(sandbox):
    sb, config, tmp = sandbox
    baseline = swe.prepare(sb, TASK, config, tmp, 60, defer_baseline=True)
    sb.exec("git init -q && touch .git/index.lock")  # git add cannot take the index
    shell, mark = swe.with_baseline(baseline, "touch ran")
    error = swe.baseline_failed(sb.exec(shell), mark)
    assert isinstance(error, swe.SetupError) and "index.lock" in str(error)
    assert sb.exec("test -e ran").exit_code == 1


@pytest.mark.integration
def test_setup_commands_run_the_baseline_themselves(sandbox):
    sb, config, tmp = sandbox
    task = TASK.model_copy(update={"setup": ["echo set > up.txt"]})
    assert swe.prepare(sb, task, config, tmp, 60, defer_baseline=True) is None
    assert sb.exec(f"git show {BASE_REF}:up.txt").stdout == "set\n"
