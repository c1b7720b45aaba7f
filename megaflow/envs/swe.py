"""SWE-style repository tasks: the sandbox they need, their setup, their evaluation.

The shape is SWE-bench's: a repo snapshot, a problem statement, a gold ``patch``, a
``test_patch`` adding the tests, and two lists of test ids. Reward is 1 iff every
FAIL_TO_PASS and PASS_TO_PASS test passes once the test patch is applied on top of
the agent's work, every file that could change that verdict restored first
(`megaflow.envs.pristine`), graded per test id as the official harness does
(`megaflow.envs.grading`).

Test ids are pytest node ids. ``test_command`` receives them as arguments: the
default ``python3 .megaflow_runtests.py`` (`RUNNER_COMMAND`; evaluation copies the
runner into the sandbox, see `megaflow.envs.runtests`) runs
``python3 -m pytest -rA -p no:cacheprovider`` where pytest imports (``-rA``: a status
line per test, which grading parses) and a pytest-free fallback for plain node ids
where it does not (images carry python3 but no pytest).
"""

from __future__ import annotations

import base64
import logging
import secrets
import shlex
from pathlib import Path

from megaflow.deadlines import Budget
from megaflow.envs import environments
from megaflow.envs.pristine import BASE_REF, GIT, patch_paths
from megaflow.envs.repos import GIT_BASELINE, fetch, image_tag, iter_files
from megaflow.sandbox.base import Sandbox, SandboxConfig

log = logging.getLogger(__name__)

#: Where evaluation puts the pytest-free runner, relative to the work directory.
RUNNER_FILE = ".megaflow_runtests.py"
#: The `test_command` that runs test ids with that runner.
RUNNER_COMMAND = f"python3 {RUNNER_FILE}"
TEST_PATCH_FILE = ".megaflow_test.patch"
#: Commits whatever setup wrote, so that only the agent's work shows in `git diff`;
#: starts the repository when the sandbox has none (files written at provision).
_COMMIT_SETUP = (
    "if [ -d .git ]; then git add -A && { git diff --cached --quiet || git -c user.name=megaflow "
    "-c user.email=megaflow@localhost -c commit.gpgsign=false commit -q -m 'task setup'; }; "
    f"else {GIT_BASELINE}; fi"
)
#: Marks what setup left as the baseline grading restores from (`megaflow.envs.pristine`).
_MARK_BASELINE = f"git update-ref {BASE_REF} HEAD"


class SetupError(RuntimeError):
    """A task's setup failed in the sandbox: the task or its image is broken."""


def sandbox_config(base: SandboxConfig, task) -> SandboxConfig:
    """The sandbox a task needs: the run's config, with the repo's image on docker."""
    if task.kind == "computer":  # a desktop, whatever the run's default backend
        return base if base.type == "desktop" else base.model_copy(update={"type": "desktop"})
    if task.kind != "swe":
        return base
    update = {"workdir": task.workdir} if task.workdir else {}
    env = task.environment
    if base.type == "docker":
        image = task.image or (image_tag(task.repo, env) if task.repo else None)
        if image is None and env is not None:
            image = environments.image_tag(env)
        if image:
            update["image"] = image
    elif env is not None and base.type == "local":
        update.update(environments.venv_config(env, base))
    return base.model_copy(update=update) if update else base


#: Commits what setup left and marks it as the baseline, in one exec (each is a docker round trip, #15 point 7).
BASELINE = f"{{ {_COMMIT_SETUP}; }} && {_MARK_BASELINE}"


def prepare(sb: Sandbox, task, config: SandboxConfig, cache_root: Path, timeout: float,
            defer_baseline: bool = False) -> str | None:
    """Put a SWE task's repo and files in the sandbox, run its setup, commit the result.

    On docker the repo is already in the image (`sandbox_config`); elsewhere its files
    are copied into the work directory here. With `defer_baseline` and no setup
    commands, the commit (`BASELINE`) is returned instead of run: the caller runs it
    ahead of its own first command, in the same exec (`with_baseline`).

    Raises:
        SetupError: a setup command failed.
        SandboxError: the sandbox failed, or the repo could not be fetched.
    """
    budget = Budget(timeout, "provisioning")  # one deadline for the whole preparation
    if task.environment is not None and config.type == "local":
        environments.ensure_venv(task.environment, environments.default_root())  # once per host and environment
    if task.repo and config.type != "docker":
        for rel, path in iter_files(fetch(task.repo, cache_root)):
            sb.write_file(rel, path.read_bytes())
    for path, content in task.files.items():
        sb.write_file(path, content.encode())
    if defer_baseline and not task.setup:
        return BASELINE
    run_setup(sb, [*task.setup, BASELINE], budget)
    return None


def with_baseline(baseline: str, cmd: str) -> tuple[str, str]:
    """(`cmd` preceded by `baseline` in one shell, the marker it prints when the baseline fails).

    The baseline's own output is kept out of the command's; on failure the shell
    prints the marker and that output, and exits before `cmd` runs (`baseline_failed`).
    """
    mark = f"megaflow-baseline-{secrets.token_hex(8)}"
    log_file = f"/tmp/{mark}"
    return (f"{{ {baseline}; }} > {log_file} 2>&1 || {{ echo {mark} $?; cat {log_file}; exit 125; }}; "
            f"rm -f {log_file}; {cmd}"), mark


def baseline_failed(result, mark: str) -> SetupError | None:
    """The setup error a `with_baseline` shell reported, or None when the baseline went through."""
    if not result.stdout.startswith(mark):
        return None
    return SetupError(f"setup command {BASELINE!r} exited {result.stdout[len(mark):].split(None, 1)[0]}: "
                      f"{result.stdout[-500:]}")


def run_setup(sb: Sandbox, commands: list[str], budget: Budget) -> None:
    """Run setup commands in order within one `budget` (the provisioning deadline).

    Raises:
        SetupError: a command failed, or the budget ran out.
    """
    for cmd in commands:
        if budget.exhausted:
            raise SetupError(budget.message())
        r = sb.exec(cmd, timeout=budget.left())
        if r.timed_out and budget.exhausted:
            raise SetupError(f"{budget.message()} (during {cmd!r})")
        if r.exit_code != 0:
            raise SetupError(f"setup command {cmd!r} exited {r.exit_code}: {(r.stderr or r.stdout)[-500:]}")


def tests_command(task, ids: list[str]) -> str:
    """`test_command` with the test ids appended (or the task's own `test_args`, when it names them)."""
    args = ids if getattr(task, "test_args", None) is None else task.test_args
    return " ".join([task.test_command, *(shlex.quote(t) for t in args)])


#: Files up to this size travel inside the command (base64); larger ones take a round trip of their own.
INLINE_BYTES = 48_000


def put_file(sb: Sandbox, path: str, content: bytes) -> str:
    """Shell that writes `content` to `path`: inline when small (no extra round trip), else written now."""
    if len(content) <= INLINE_BYTES:
        return f"echo {base64.b64encode(content).decode()} | base64 -d > {shlex.quote(path)}"
    sb.write_file(path, content)
    return "true"


def test_patch_command(sb: Sandbox, task) -> str:
    """Shell that restores the files the test patch touches, then applies it (``true`` without one).

    Restoring first (as SWE-bench does) means an agent that edited the tests can
    neither block the patch nor weaken the checks. Exits non-zero when it does not apply.
    """
    if not task.test_patch:
        return "true"
    restore = [f"{{ {GIT} checkout -q {BASE_REF} -- {shlex.quote(p)} 2>/dev/null || rm -f -- {shlex.quote(p)}; }}"
               for p in patch_paths(task.test_patch)]
    write = put_file(sb, TEST_PATCH_FILE, task.test_patch.encode())
    apply = f"{{ {GIT} apply {TEST_PATCH_FILE} || patch -p1 --forward < {TEST_PATCH_FILE}; }}"
    return " ; ".join([*restore, f"{write} && {apply}"])


def runner_command(sb: Sandbox, task) -> str:
    """Shell that copies the pytest-free runner in when the task's test command uses it."""
    if RUNNER_FILE not in task.test_command:
        return "true"
    return put_file(sb, RUNNER_FILE, (Path(__file__).parent / "runtests.py").read_bytes())
