"""The test runner SWE tasks use by default: pytest where it imports, a refusing fallback elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import PARAMETRIZED_TESTS

from megaflow.envs import runtests

RUNNER = Path(runtests.__file__)


def _run(tmp_path: Path, *args: str, fallback: bool = False) -> subprocess.CompletedProcess:
    (tmp_path / "tests").mkdir(exist_ok=True)
    (tmp_path / "tests" / "test_p.py").write_text(PARAMETRIZED_TESTS)
    env = {k: v for k, v in os.environ.items() if k != runtests.NO_PYTEST_ENV}
    if fallback:
        env[runtests.NO_PYTEST_ENV] = "1"
    return subprocess.run([sys.executable, str(RUNNER), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_parametrized_ids_and_options_go_to_pytest(tmp_path):
    r = _run(tmp_path, "-q", "tests/test_p.py::test_lt[1-2]", "tests/test_p.py::test_lt[2-2]")
    assert "PASSED tests/test_p.py::test_lt[1-2]" in r.stdout, r.stdout
    assert "FAILED tests/test_p.py::test_lt[2-2]" in r.stdout and r.returncode == 1
    assert not (tmp_path / ".pytest_cache").exists()  # -p no:cacheprovider


def test_fallback_refuses_parametrized_ids_and_options(tmp_path):
    r = _run(tmp_path, "tests/test_p.py::test_lt[1-2]", fallback=True)
    assert r.returncode == runtests.USAGE_ERROR and "pip: [pytest]" in r.stderr and "test_lt[1-2]" in r.stderr
    r = _run(tmp_path, "-x", "tests/test_p.py::test_plain", fallback=True)
    assert r.returncode == runtests.USAGE_ERROR and "'-x'" in r.stderr


def test_fallback_runs_plain_ids(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_q.py").write_text("def test_ok():\n    assert 1\n")
    r = subprocess.run([sys.executable, str(RUNNER), "tests/test_q.py::test_ok"], cwd=tmp_path,
                       env={**os.environ, runtests.NO_PYTEST_ENV: "1"}, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and "PASSED tests/test_q.py::test_ok" in r.stdout, r.stdout + r.stderr
