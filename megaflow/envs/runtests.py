"""Run tests by pytest node id: with pytest where it is installed, else without it.

SWE tasks' default ``test_command`` is ``python3 .megaflow_runtests.py``; evaluation
copies this file (standard library only) into the work directory and appends the
FAIL_TO_PASS and PASS_TO_PASS ids, exactly as it would for ``python -m pytest``.

Where ``pytest`` imports (an image or a task ``environment`` that has it), the runner
becomes ``python -m pytest -rA -p no:cacheprovider ARGS...``: every node id
(parametrized ones such as ``tests/test_x.py::test_y[a-b]`` included) and option is
pytest's. Only where pytest is absent (sandboxes have no network to install it) does
the fallback below run, and it refuses what it cannot do (options, parametrized ids)
with a message naming the fix: an ``environment`` with ``pip: [pytest]``.

Fallback ids: ``path/test_x.py::test_func``, ``path/test_x.py::TestClass::test_method``
and ``path/test_x.py`` (every ``test*`` function and method of the file). Test
functions are plain functions with ``assert`` (the only fixture offered is
``tmp_path``) or methods of `unittest.TestCase` subclasses or of plain ``Test*``
classes (``setup_method``/``teardown_method`` are called). A skipped test
(`unittest.SkipTest`) is reported ``SKIPPED`` (grading counts it as not passed, as the
official harness does for FAIL_TO_PASS tests). Fixtures other than ``tmp_path`` and
conftest files are not supported.

Prints one line per test (``PASSED id`` / ``FAILED id`` / ``ERROR id`` / ``SKIPPED id``:
pytest's ``-rA`` summary format, which grading parses with the ``swebench`` pytest
parser; a traceback after failures) and ``N passed, N failed``; exits 0 iff at least one test ran and
every test passed.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import tempfile
import traceback
import unittest
from pathlib import Path

PASSED, FAILED, ERROR, SKIPPED = "PASSED", "FAILED", "ERROR", "SKIPPED"
#: pytest's arguments ahead of the task's: a status line per test, no cache written.
PYTEST_ARGS = ("-rA", "-p", "no:cacheprovider")
#: Set (to anything) to use the fallback even where pytest imports (tests of the fallback).
#: Read from the environment, not `Settings`: this file runs alone (standard library
#: only) inside sandboxes, where neither MegaFlow nor pydantic is importable.
NO_PYTEST_ENV = "MEGAFLOW_RUNTESTS_NO_PYTEST"
#: Exit status of a refused command line (pytest's own usage-error status).
USAGE_ERROR = 4
_GET_PYTEST = "give the task an `environment` with `pip: [pytest]` (or an image that has pytest)"


def load_module(path: Path):
    """Import a test file the way pytest's default (prepend) import mode does."""
    root = path.parent
    while (root / "__init__.py").exists():
        root = root.parent
    for entry in (str(root), os.getcwd()):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    rel = path.relative_to(root).with_suffix("")
    name = ".".join(rel.parts)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def call_function(fn) -> None:
    params = inspect.signature(fn).parameters
    kwargs = {}
    with tempfile.TemporaryDirectory(prefix="megaflow-test-") as tmp:
        for name in params:
            if name != "tmp_path":
                raise TypeError(f"fixture {name!r} is not supported (only tmp_path)")
            kwargs[name] = Path(tmp)
        fn(**kwargs)


def run_case(cls, method: str) -> tuple[str, str]:
    if issubclass(cls, unittest.TestCase):
        result = unittest.TestResult()
        cls(method).run(result)
        problems = result.errors + result.failures + [(t, "unexpected success") for t in result.unexpectedSuccesses]
        if problems:
            return FAILED, "\n".join(text for _, text in problems)
        return (SKIPPED, "") if result.skipped else (PASSED, "")
    instance = cls()
    if hasattr(instance, "setup_method"):
        instance.setup_method(getattr(instance, method))
    try:
        call_function(getattr(instance, method))
    finally:
        if hasattr(instance, "teardown_method"):
            instance.teardown_method(getattr(instance, method))
    return PASSED, ""


def run_one(module, parts: list[str]) -> tuple[str, str]:
    """Run the test named by `parts` (the node id after the file)."""
    if not 1 <= len(parts) <= 2 or not _defined(module, parts):
        return ERROR, f"no such test: {'::'.join(parts)}"
    try:
        if len(parts) == 1:
            call_function(getattr(module, parts[0]))
            return PASSED, ""
        return run_case(getattr(module, parts[0]), parts[1])
    except unittest.SkipTest:
        return SKIPPED, ""
    except Exception:  # noqa: BLE001 - any exception is the test's failure
        return FAILED, traceback.format_exc()


def _defined(module, parts: list[str]) -> bool:
    obj = module
    for part in parts:
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def expand(node_id: str) -> list[str]:
    """A file id becomes the ids of every test in it; others stay as they are."""
    if "::" in node_id:
        return [node_id]
    module = load_module(Path(node_id).resolve())
    ids = []
    for name, obj in vars(module).items():
        if name.startswith("test") and inspect.isfunction(obj):
            ids.append(f"{node_id}::{name}")
        elif name.startswith("Test") and inspect.isclass(obj):
            ids += [f"{node_id}::{name}::{m}" for m in dir(obj) if m.startswith("test")]
    return ids


def has_pytest() -> bool:
    """Whether this interpreter can import pytest (and the fallback is not forced)."""
    return not os.environ.get(NO_PYTEST_ENV) and importlib.util.find_spec("pytest") is not None


def refusal(argv: list[str]) -> str | None:
    """Why the fallback cannot run `argv` (options, parametrized ids), or None."""
    options = [a for a in argv if a.startswith("-")]
    if options:
        return f"pytest options {options} need pytest, which is not installed: {_GET_PYTEST}"
    params = [a for a in argv if "[" in a.split("::")[-1]]
    if params:
        return f"parametrized test ids {params[:3]} need pytest, which is not installed: {_GET_PYTEST}"
    return None


def main(argv: list[str]) -> int:
    if has_pytest():
        # exec, not a child: pytest's output and exit status are the runner's.
        os.execv(sys.executable, [sys.executable, "-m", "pytest", *PYTEST_ARGS, *argv])
    if not argv:
        print("usage: runtests.py NODE_ID...", file=sys.stderr)
        return 2
    if why := refusal(argv):
        print(f"ERROR: {why}", file=sys.stderr)
        return USAGE_ERROR
    passed = failed = 0
    for arg in argv:
        try:
            node_ids = expand(arg)
        except Exception:  # noqa: BLE001 - an import error fails the file's tests
            node_ids, status, detail = [], ERROR, traceback.format_exc()
            print(f"{status} {arg}\n{detail}")
            failed += 1
        for node_id in node_ids:
            path, *parts = node_id.split("::")
            try:
                module = load_module(Path(path).resolve())
                status, detail = run_one(module, parts)
            except Exception:  # noqa: BLE001 - reported as an error of this test
                status, detail = ERROR, traceback.format_exc()
            if detail and status != PASSED:
                print(detail.rstrip())
            print(f"{status} {node_id}")
            passed += status in (PASSED, SKIPPED)
            failed += status not in (PASSED, SKIPPED)
    print(f"{passed} passed, {failed} failed")
    return 0 if passed and not failed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
