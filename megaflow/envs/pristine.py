"""Tamper-proof grading: put back every file that can change the tests' verdict.

An agent works in the very sandbox its tests later run in, so it can rewrite the
tests, add a ``conftest.py`` that skips or passes everything, or edit the test
configuration. Before the tests run, `restore` resets all of these to the state
the task's setup left (`BASE_REF`, a git ref `megaflow.envs.swe.prepare` writes):

* the files ``test_patch`` touches and every file holding a FAIL_TO_PASS or
  PASS_TO_PASS test;
* every ``conftest.py`` of the repository (added ones are removed);
* ``pytest.ini``, ``.pytest.ini``, ``tox.ini`` and ``setup.cfg`` at the root and in
  every directory above a test file, and the pytest/tox sections of the
  ``pyproject.toml`` files there (the rest of the file keeps the agent's edits);
* the task's own `protected_files`;
* new files at the repository root that would shadow a module the test machinery
  imports (``pytest.py``, ``unittest.py``, ``sitecustomize.py``...): removed.

It also stops processes the agent left running (they could rewrite files while
the tests run) and clears ``__pycache__`` directories (stale bytecode).

The baseline is the ref, never ``HEAD``: an agent that commits its changes moves
``HEAD``, not the ref, so its commits still count as its patch and are restored
like the rest. A sandbox without the ref is graded 0 (`BaselineMissing`).
"""

from __future__ import annotations

import posixpath
import re
import shlex
import sys

#: The commit the task's setup produced; what "pristine" means.
BASE_REF = "refs/megaflow/base"
#: git, deaf to what the agent may have configured in the repository.
GIT = ("GIT_NO_REPLACE_OBJECTS=1 GIT_CONFIG_NOSYSTEM=1 git -c core.hooksPath=/dev/null "
       "-c core.fsmonitor=false -c core.attributesFile=/dev/null")
#: Test configuration files restored whole, at the root and above every test file.
CONFIG_FILES = ("pytest.ini", ".pytest.ini", "tox.ini", "setup.cfg")
#: Top-level module names an added root file may not take (besides the standard library).
SHADOWED = frozenset({"pytest", "_pytest", "py", "pluggy", "sitecustomize", "usercustomize", "conftest"})
#: pyproject.toml tables that configure the test run.
_TEST_TABLE = re.compile(r"^\s*\[+\s*tool\.(pytest|tox)\b")
_TABLE = re.compile(r"^\s*\[")
#: Kills every process this shell may signal except itself, its ancestors (``kill -1``
#: would take the local backend's launcher with it) and the sandbox's keeper: the
#: first child of pid 1 (docker's ``sleep``), started before any agent command.
_KILL_STRAYS = (
    'ppid() { sed -n "s/^PPid:[[:space:]]*//p" "/proc/$1/status" 2>/dev/null; }; '
    'anc=" 1 $$ "; p=$$; while [ "${p:-0}" -gt 1 ]; do p=$(ppid "$p"); anc="$anc${p:-0} "; done; '
    'keeper=$(for d in /proc/[0-9]*; do q=${d#/proc/}; [ "$(ppid "$q")" = 1 ] && echo "$q"; done | sort -n | head -1); '
    'anc="$anc${keeper:-0} "; '
    'for d in /proc/[0-9]*; do q=${d#/proc/}; case "$anc" in *" $q "*) ;; *) kill -9 "$q" 2>/dev/null;; esac; done'
)


class BaselineMissing(RuntimeError):
    """The sandbox has no `BASE_REF`: nothing to restore from, so no verdict can be trusted."""


def test_files(task) -> list[str]:
    """Files named by the task's test ids (``path.py::name`` or a bare ``path.py``)."""
    files = set()
    for test in [*task.FAIL_TO_PASS, *task.PASS_TO_PASS]:
        path = test.split("::", 1)[0].split("[", 1)[0].strip()
        if path.endswith(".py") and not path.startswith("/") and ".." not in path.split("/"):
            files.add(path)
    return sorted(files)


def _dirs_above(files: list[str]) -> list[str]:
    """The root ("") and every directory above each file."""
    dirs = {""}
    for f in files:
        d = posixpath.dirname(f)
        while d:
            dirs.add(d)
            d = posixpath.dirname(d)
    return sorted(dirs)


def protected_paths(task) -> tuple[list[str], list[str]]:
    """(files restored whole, ``pyproject.toml`` files whose test sections are restored)."""
    from megaflow.envs.swe import patch_paths

    tests = test_files(task)
    dirs = _dirs_above(tests)
    whole = set(tests) | set(patch_paths(task.test_patch)) | set(getattr(task, "protected_files", []))
    whole |= {posixpath.join(d, name) for d in dirs for name in CONFIG_FILES}
    return sorted(whole), [posixpath.join(d, "pyproject.toml") for d in dirs]


def _restore_one(var: str) -> str:
    return (f'if {GIT} cat-file -e "{BASE_REF}:${var}" 2>/dev/null; then {GIT} checkout -q {BASE_REF} -- "${var}"; '
            f'else rm -rf -- "${var}"; fi')


def restore_command(paths: list[str], then: str = "exit 0") -> str:
    """Shell: stop stray processes, clear bytecode, restore `paths` and every conftest.py from the baseline.

    `then` runs last (the exit status is its own): evaluation appends what it asks
    next, since every sandbox round trip is a ``docker exec`` (#15 point 7).
    """
    quoted = " ".join(shlex.quote(p) for p in paths)
    return "; ".join([
        _KILL_STRAYS,
        f"{GIT} rev-parse -q --verify {BASE_REF} >/dev/null || {{ echo 'megaflow: baseline missing' >&2; exit 3; }}",
        "find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null",
        f"for p in {quoted}; do {_restore_one('p')}; done" if quoted else "true",
        f"{{ {GIT} ls-tree -r --name-only {BASE_REF} | grep -E '(^|/)conftest\\.py$'; "
        "find . -path ./.git -prune -o -name conftest.py -print | sed 's|^\\./||'; } | sort -u | "
        f"while IFS= read -r p; do {_restore_one('p')}; done",
        then,
    ])


#: Printed between the restore's output and the root listing's.
_ADDED_MARK = "megaflow-added-root-names:"


def added_root_names_command() -> str:
    """Shell: names at the repository root that the baseline does not have."""
    return (f"{GIT} ls-tree --name-only {BASE_REF} > .megaflow_base_names 2>/dev/null; "
            "ls -A1 | grep -vxF -f .megaflow_base_names | grep -vx -e .git -e .megaflow_base_names; "
            "rm -f .megaflow_base_names; true")


def shadowing(names: list[str]) -> list[str]:
    """Those of `names` (root entries the agent added) that would shadow a module the tests import."""
    bad = []
    for name in names:
        module = name[:-3] if name.endswith(".py") else name.split(".", 1)[0]
        if module in SHADOWED or module in sys.stdlib_module_names:
            bad.append(name)
    return bad


def merge_pyproject(pristine: str, current: str) -> str:
    """`current` with its pytest/tox tables replaced by those of `pristine` (added ones dropped)."""

    def split(text: str) -> tuple[list[str], list[str]]:
        other, test, keep = [], [], True
        for line in text.splitlines(keepends=True):
            if _TABLE.match(line):
                keep = not _TEST_TABLE.match(line)
            (other if keep else test).append(line)
        return other, test

    other, _ = split(current)
    _, test = split(pristine)
    body = "".join(other)
    if test and body and not body.endswith("\n"):
        body += "\n"
    return body + "".join(test)


def restore(sb, task, timeout: float) -> None:
    """Put every verdict-changing file back to the baseline; see the module docstring.

    Raises:
        BaselineMissing: the sandbox has no baseline ref.
        SandboxError: the sandbox failed.
    """
    whole, pyprojects = protected_paths(task)
    # One exec for the restore and the root listing; the marker parts their output.
    r = sb.exec(restore_command(whole, then=f"echo {_ADDED_MARK}; {added_root_names_command()}"), timeout=timeout)
    if r.exit_code == 3:
        raise BaselineMissing(f"{BASE_REF} is missing: the repository's history was tampered with")
    if f"{_ADDED_MARK}\n" in r.stdout:
        added = r.stdout.rsplit(f"{_ADDED_MARK}\n", 1)[1].split()
    else:  # not expected: ask on its own rather than skip the check
        added = sb.exec(added_root_names_command(), timeout=timeout).stdout.split()
    bad = shadowing(added)
    if bad:
        sb.exec("rm -rf -- " + " ".join(shlex.quote(n) for n in bad), timeout=timeout)
    for path in pyprojects:
        q = shlex.quote(path)
        # Exit status 10 * exists + shown; stdout is the baseline's file when shown.
        shown = sb.exec(f"e=0; test -f {q} && e=1; {GIT} show {BASE_REF}:{q} 2>/dev/null; "
                        "exit $((e * 10 + ($? == 0)))", timeout=timeout)
        pristine = shown.stdout if shown.exit_code in (1, 11) else None
        exists = shown.exit_code in (10, 11)
        if not exists and pristine is None:
            continue
        current = sb.read_file(path).decode("utf-8", "replace") if exists else ""
        merged = merge_pyproject(pristine or "", current)
        if merged != current:
            sb.write_file(path, merged.encode())
