"""A SWE task whose tests ship in the repository (empty test_patch), run by real pytest, and scripted agents.

pytest (and what it imports) is vendored into the task's files under
``.pytest_vendor/`` from this interpreter's site-packages, so that the same task
runs under pytest on every backend without building an image. The agents:

* ``oracle``: the gold patch (reward 1);
* ``noop``: nothing (reward 0);
* ``neuter``: rewrites the failing tests into no-ops;
* ``neuter_commit``: the same, committed (``HEAD`` moves);
* ``conftest``: a root ``conftest.py`` turning every failed report into a pass;
* ``conftest_skip``: a ``tests/conftest.py`` skipping every test;
* ``ini``: a new ``pytest.ini`` loading a plugin that turns failures into passes;
* ``pyproject``: the same plugin through ``[tool.pytest.ini_options]``;
* ``setup_cfg``: the same through ``setup.cfg``'s ``[tool:pytest]``;
* ``background``: a process left running that rewrites the failing tests again and again;
* ``shadow``: a ``pytest.py`` at the root, shadowing pytest itself.

Every tamper agent earns 1 when restoration is switched off (see the tests), so
the tests that expect 0 can fail.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import textwrap
from pathlib import Path

from megaflow.spec import SWETask

VENDOR = ".pytest_vendor"
_VENDORED = ("pytest", "_pytest", "pluggy", "iniconfig", "packaging", "py", "pygments")

CALC = '''\
"""A tiny calculator."""


def add(a, b):
    return a + b


def clamp(x, lo, hi):
    """x limited to [lo, hi]."""
    return max(lo, x)
'''
TESTS = '''\
from calc import add, clamp


def test_add():
    assert add(2, 3) == 5


def test_clamp_low():
    assert clamp(-5, 0, 10) == 0


def test_clamp_high():
    assert clamp(50, 0, 10) == 10


def test_clamp_inside():
    assert clamp(5, 0, 10) == 5
'''
GOLD = '''\
diff --git a/calc.py b/calc.py
--- a/calc.py
+++ b/calc.py
@@ -8,4 +8,4 @@ def add(a, b):

 def clamp(x, lo, hi):
     """x limited to [lo, hi]."""
-    return max(lo, x)
+    return min(hi, max(lo, x))
'''
PLUGIN = '''\
import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    report.outcome = "passed"
'''


def _vendored_files() -> dict[str, str]:
    files = {}
    for name in _VENDORED:
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin)
        if origin.name == "__init__.py":
            for path in origin.parent.rglob("*.py"):
                files[f"{VENDOR}/{name}/{path.relative_to(origin.parent).as_posix()}"] = path.read_text()
        else:
            files[f"{VENDOR}/{origin.name}"] = origin.read_text()
    for dist in ("pytest", "pluggy", "iniconfig", "packaging"):  # pytest reads their metadata
        info = Path(importlib.metadata.distribution(dist)._path)
        for path in info.iterdir():
            if path.is_file() and path.name != "RECORD":
                files[f"{VENDOR}/{info.name}/{path.name}"] = path.read_text()
    return files


def task(repo: Path) -> SWETask:
    """The task (`clamp` ignores its upper bound), its repository written to `repo`."""
    files = {"calc.py": CALC, "tests/test_calc.py": TESTS, "tests/__init__.py": "",
             "pyproject.toml": '[project]\nname = "calc"\nversion = "0.1"\n',
             "setup.cfg": "[metadata]\nname = calc\n", **_vendored_files()}
    for rel, text in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    return SWETask(
        instance_id="calc-1", problem_statement="clamp ignores hi", repo=str(repo),
        test_command=f"PYTHONPATH={VENDOR} python3 -m pytest -rA -p no:cacheprovider",
        FAIL_TO_PASS=["tests/test_calc.py::test_clamp_high"],
        PASS_TO_PASS=["tests/test_calc.py::test_add", "tests/test_calc.py::test_clamp_low",
                      "tests/test_calc.py::test_clamp_inside"],
        patch=GOLD, protected_files=[VENDOR],
    )


def _write(path: str, text: str) -> str:
    return f"cat > {path} <<'MEGAFLOW_EOF'\n{textwrap.dedent(text)}MEGAFLOW_EOF"


_NEUTER = "sed -i 's/assert clamp(50, 0, 10) == 10/assert True/' tests/test_calc.py"

#: Scripted agents: the shell commands each runs in the sandbox.
AGENTS: dict[str, list[str]] = {
    "oracle": [_write(".gold.patch", GOLD), "git apply .gold.patch && rm .gold.patch"],
    "noop": [],
    "neuter": [_NEUTER],
    "neuter_commit": [_NEUTER, "git -c user.name=a -c user.email=a@b commit -qam tests"],
    "conftest": [_write("conftest.py", PLUGIN)],
    "conftest_skip": [_write("tests/conftest.py", '''\
        import pytest


        def pytest_collection_modifyitems(items):
            for item in items:
                item.add_marker(pytest.mark.skip(reason="no"))
        ''')],
    "ini": [_write("tamper_plugin.py", PLUGIN), _write("pytest.ini", "[pytest]\naddopts = -p tamper_plugin\n")],
    "pyproject": [_write("tamper_plugin.py", PLUGIN),
                  "printf '\\n[tool.pytest.ini_options]\\naddopts = \"-p tamper_plugin\"\\n' >> pyproject.toml"],
    "setup_cfg": [_write("tamper_plugin.py", PLUGIN),
                  "printf '\\n[tool:pytest]\\naddopts = -p tamper_plugin\\n' >> setup.cfg"],
    # A process left running that neuters the tests again once the restore is done
    # (and neuters them now: a local sandbox ends it with its command, a race otherwise).
    "background": [_NEUTER, _write(".neuter.sh", f"while :; do {_NEUTER}; sleep 0.02; done\n"),
                   "nohup sh .neuter.sh >/dev/null 2>&1 &"],
    "shadow": [_write("pytest.py", '''\
        import sys
        print("PASSED tests/test_calc.py::test_clamp_high")
        for t in ("test_add", "test_clamp_low", "test_clamp_inside"):
            print("PASSED tests/test_calc.py::" + t)
        sys.exit(0)
        ''')],
}
#: Agents that game an unprotected grader.
TAMPER = [name for name in AGENTS if name not in ("oracle", "noop", "conftest_skip")]


def restoration_off(mp) -> None:
    """Undo each part of grading's restore on monkeypatch `mp`: files, shadowing names, pyproject tables.

    With it every tamper agent games the reward, which shows the tamper tests can fail.
    """
    from megaflow.envs import pristine

    mp.setattr(pristine, "restore_command", lambda paths, then="exit 0": then)
    mp.setattr(pristine, "merge_pyproject", lambda base, current: current)
