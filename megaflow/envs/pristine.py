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

import base64
import posixpath
import re
import secrets
import shlex
import sys
from collections.abc import Callable

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
#: One awk over every /proc/PID/status where there is awk (a sed per process cost a
#: fifth of an exec, #15 point 7); the same walk in plain shell where there is none.
_KILL_STRAYS = (
    'if command -v awk >/dev/null 2>&1; then '
    # cat, not awk, opens the files: awk gives up at the first one gone (a process that exited).
    "strays=$(cat /proc/[0-9]*/status 2>/dev/null | awk -v self=$$ '/^Pid:/ { pid = $2 } "
    "/^PPid:/ { pp[pid] = $2 } "
    "END { anc[0] = anc[1] = 1; p = self; while (p > 1) { anc[p] = 1; p = (p in pp) ? pp[p] : 0 } "
    "k = 0; for (q in pp) if (pp[q] == 1 && (k == 0 || q + 0 < k)) k = q + 0; "
    "for (q in pp) if (!(q in anc) && q + 0 != k) print q }'); "
    'for q in $strays; do kill -9 "$q" 2>/dev/null; done; '
    'else '
    'ppid() { sed -n "s/^PPid:[[:space:]]*//p" "/proc/$1/status" 2>/dev/null; }; '
    'anc=" 1 $$ "; p=$$; while [ "${p:-0}" -gt 1 ]; do p=$(ppid "$p"); anc="$anc${p:-0} "; done; '
    'keeper=$(for d in /proc/[0-9]*; do q=${d#/proc/}; [ "$(ppid "$q")" = 1 ] && echo "$q"; done | sort -n | head -1); '
    'anc="$anc${keeper:-0} "; '
    'for d in /proc/[0-9]*; do q=${d#/proc/}; case "$anc" in *" $q "*) ;; *) kill -9 "$q" 2>/dev/null;; esac; done; '
    'fi'
)


class BaselineMissing(RuntimeError):
    """The sandbox has no `BASE_REF`: nothing to restore from, so no verdict can be trusted."""


class RestoreFailed(BaselineMissing):
    """The restore stopped before its end: the verdict cannot be trusted either."""


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


def patch_paths(patch: str) -> list[str]:
    """Files a unified diff touches (old and new names)."""
    paths = set()
    for m in re.finditer(r"^(?:---|\+\+\+) (?:[ab]/)?(\S+)", patch, flags=re.MULTILINE):
        if m.group(1) != "/dev/null":
            paths.add(m.group(1))
    return sorted(paths)


def protected_paths(task) -> tuple[list[str], list[str]]:
    """(files restored whole, ``pyproject.toml`` files whose test sections are restored)."""
    tests = test_files(task)
    dirs = _dirs_above(tests)
    whole = set(tests) | set(patch_paths(task.test_patch)) | set(getattr(task, "protected_files", []))
    whole |= {posixpath.join(d, name) for d in dirs for name in CONFIG_FILES}
    return sorted(whole), [posixpath.join(d, "pyproject.toml") for d in dirs]


def restore_command(paths: list[str], then: str = "exit 0") -> str:
    """Shell: stop stray processes, clear bytecode, restore `paths` and every conftest.py from the baseline.

    Remove, then check out of the baseline what it has: a path the baseline lacks
    stays removed. A handful of git processes whatever the number of paths (one
    per path cost a fifth of a second on a small task, #15 point 7). Then remove
    the root names the agent added that would shadow a module the tests import
    (`shadow_removal_command`). `then` runs last (the exit status is its own).
    """
    quoted = " ".join(shlex.quote(p) for p in paths)
    checkout = f"xargs -0 -r env {GIT} checkout -q {BASE_REF} --"
    listed = f"{GIT} ls-tree -r -z --name-only {BASE_REF} -- {quoted}; " if quoted else ""
    return "; ".join([
        _KILL_STRAYS,
        f"{GIT} rev-parse -q --verify {BASE_REF} >/dev/null || {{ echo 'megaflow: baseline missing' >&2; exit 3; }}",
        "find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null",
        f"rm -rf -- {quoted}" if quoted else "true",
        "find . -path ./.git -prune -o -name conftest.py -print0 | xargs -0 -r rm -rf --",
        f"{{ {listed}{GIT} ls-tree -r -z --name-only {BASE_REF} | grep -z -E '(^|/)conftest\\.py$'; }} | {checkout}",
        shadow_removal_command(),
        then,
    ])


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


def shadow_removal_command() -> str:
    """Shell: remove the root names the agent added that `shadowing` names, in the sandbox itself.

    Done in the restore's own exec rather than decided here after it: one sandbox
    round trip fewer per evaluation (#15 point 7). The module names form one
    ``case`` pattern of exact alternatives (identifiers: no glob characters).
    """
    modules = "|".join(sorted(SHADOWED | set(sys.stdlib_module_names)))
    return (f"{{ {added_root_names_command()}; }} | while IFS= read -r n; do "
            'case "$n" in *.py) m=${n%.py};; *) m=${n%%.*};; esac; '
            f'case "$m" in {modules}) rm -rf -- "./$n";; esac; done')


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


class Restore:
    """A restore, and what runs after it (the tests), in one sandbox round trip when nothing is left to fix.

    `command` (one exec) runs `before` (evaluation's diff of the agent's work; its
    output becomes `before_output`), then the restore, then checks each
    ``pyproject.toml`` on the tests' paths against the baseline. When none differs,
    the restore is complete and `then` runs in the same exec (`ran_then`); when one
    does, the exec prints it as the baseline and the agent have it, and `read`
    yields `finish`: the shell that puts its pytest/tox tables back, to be run
    before `then` in a second exec. Every section is framed by a per-evaluation
    nonce (`mark`, also for `then`'s own sections: `then` is made from the plan), so
    nothing the agent wrote (file names, its diff, its tests' output) can pass for a section.

    Raises (from `read`):
        BaselineMissing: the sandbox has no baseline ref.
    """

    def __init__(self, task, before: str = "true", then: Callable[[Restore], str] = lambda plan: "true"):
        self.whole, self.pyprojects = protected_paths(task)
        self.mark = f"megaflow-{secrets.token_hex(8)}"
        self.before_output = ""
        self.finish = "true"
        self.ran_then = False
        self.sections: dict[str, str] = {}
        m = self.mark
        # In the repository's .git, not /tmp: it must outlive the exec (a local sandbox's
        # /tmp is per command) for a timed-out evaluation to fetch it, and stay out of the tests' way.
        self.saved = f".git/{m}.before"
        self.then = then(self)
        contents = []
        for i, path in enumerate(self.pyprojects):
            q = shlex.quote(path)
            contents.append(f"echo {m}:base:{i}; {GIT} show {BASE_REF}:{q} 2>/dev/null | base64 -w0; echo; "
                            f"echo {m}:current:{i}; test -f {q} && base64 -w0 < {q}; echo")
        changed = "false"
        if contents:
            # Sent only when one differs from the baseline (edited, committed, deleted or added):
            # two git calls instead of three per file, on the common path of an untouched one.
            q = " ".join(shlex.quote(p) for p in self.pyprojects)
            changed = (f"! {{ {GIT} diff --quiet {BASE_REF} -- {q} 2>/dev/null && "
                       f"[ -z \"$({GIT} ls-files --others -- {q})\" ]; }}")
        saved = self.saved
        self.command = "; ".join([
            f"{{ {before}; }} > {saved} 2>/dev/null", f"echo {m}:restore",
            # Its own process: the restore stops every process but its ancestors, and a
            # subshell shares the script's $$, so it would take itself for a stray.
            f"bash -c {shlex.quote(restore_command(self.whole))}", "rc=$?", f"echo {m}:rc:$rc",
            (f"if [ $rc != 0 ]; then true; elif {changed}; then {'; '.join(contents) or 'true'}; "
             f"else echo {m}:then; {self.then}; fi"),
            # `before`'s output (a diff: the largest part) last, so that an output cut in its
            # middle (`max_output_bytes` keeps head and tail) costs none of the sections.
            f"echo {m}:before", f"cat {saved}; rm -f {saved}"])

    def read(self, stdout: str) -> str:
        """Parse the exec's output; returns the `finish` shell (also kept as ``self.finish``).

        `ran_then` tells whether `then` ran; its sections are in `sections`.
        """
        m = self.mark
        _, _, rest = stdout.partition(f"{m}:restore\n")
        rest, _, self.before_output = rest.partition(f"{m}:before\n")
        self.sections = sections = self.parse_sections(rest)
        if "rc:3" in sections:
            raise BaselineMissing(f"{BASE_REF} is missing: the repository's history was tampered with")
        if "rc:0" not in sections:
            rc = next((k for k in sections if k.startswith("rc:")), "no exit status")
            raise RestoreFailed(f"restoring the pristine files did not finish ({rc}): {rest[-300:]!r}")
        self.ran_then = "then" in sections
        fixes = []
        for i, path in enumerate(self.pyprojects):
            base, current = sections.get(f"base:{i}", "").strip(), sections.get(f"current:{i}")
            pristine_text = _unb64(base) if base else None
            current_text = _unb64(current.strip()) if current and current.strip() else ""
            if pristine_text is None and not current_text:
                continue
            merged = merge_pyproject(pristine_text or "", current_text)
            if merged != current_text:
                encoded = base64.b64encode(merged.encode()).decode()
                fixes.append(f"echo {encoded} | base64 -d > {shlex.quote(path)}")
        self.finish = " && ".join(fixes) or "true"
        return self.finish

    def parse_sections(self, text: str) -> dict[str, str]:
        """The `mark`-framed sections of `text`: name -> content (each ends with its newline)."""
        m = re.escape(self.mark)
        return dict(re.findall(rf"^{m}:(\S+)\n(.*?)(?=^{m}:|\Z)", text, re.S | re.M))


def _unb64(text: str) -> str:
    return base64.b64decode(text.strip() or b"").decode("utf-8", "replace")


def restore(sb, task, timeout: float) -> None:
    """Put every verdict-changing file back to the baseline (one exec, two when a pyproject.toml changed).

    Raises:
        BaselineMissing: the sandbox has no baseline ref.
        SandboxError: the sandbox failed.
    """
    plan = Restore(task)
    plan.read(sb.exec(plan.command, timeout=timeout).stdout)
    if plan.finish != "true":
        sb.exec(plan.finish, timeout=timeout)
