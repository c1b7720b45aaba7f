"""Prove a task set, as SWE-bench validates gold patches: gold solution → reward 1, no change → reward 0.

Each task runs directly in a sandbox of the chosen backend, through the same
`setup` and `evaluate` functions the env hops use, without the queueing pipeline
(the oracle agent's commands are those of `megaflow.agent.oracle`). For SWE tasks it
also checks each FAIL_TO_PASS test fails and the PASS_TO_PASS tests pass on the
untouched repo, so a reward of 0 there means "the bug is present", not "the
task is broken".

It reads task files (`megaflow.spec`) and runs the oracle agent, so it sits above the
task families in `megaflow.envs`, beside `megaflow.preflight`.
"""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from megaflow.agent.oracle import solution_commands
from megaflow.envs import grading, swe
from megaflow.errors import SandboxError, SpecError
from megaflow.sandbox.base import SandboxBackend, SandboxConfig
from megaflow.spec import RunSpec, TaskSpec, format_errors, load_tasks

log = logging.getLogger(__name__)

#: Label on validation sandboxes (no host label: the reaper leaves them to us).
VALIDATE_LABEL = "megaflow.validate"
#: Characters of a failed command's output a problem shows.
TAIL_CHARS = 1500


@dataclass
class TaskReport:
    """What validating one task found."""

    instance_id: str
    kind: str
    gold: float | None = None
    empty: float | None = None
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems and self.gold == 1.0 and self.empty == 0.0


def load_task_set(path: str | Path) -> list:
    """Tasks from a tasks file, a directory of them, or a run spec.

    Raises:
        SpecError: unreadable or invalid.
    """
    path = Path(path)
    raw = None
    if path.is_file() and path.suffix in (".yaml", ".yml", ".json"):
        from megaflow.spec import _read_structured

        try:
            raw = _read_structured(path)
        except (OSError, ValueError) as exc:
            raise SpecError(f"cannot read {path}: {exc}") from exc
    if isinstance(raw, dict) and ("tasks_file" in raw or "model" in raw or "agent" in raw):
        return list(RunSpec.load(path).tasks)
    adapter = TypeAdapter(list[TaskSpec])
    try:
        return adapter.validate_python(load_tasks(path))
    except ValidationError as exc:
        raise SpecError(f"invalid tasks in {path}:\n{format_errors(exc)}") from exc


def validate_task(backend: SandboxBackend, base: SandboxConfig, task, cache_root: Path,
                  timeout: float = 300.0) -> TaskReport:
    """Run one task with its gold solution and with no change; see the module docstring."""
    from megaflow.envs.grading import CHECK_FILE
    from megaflow.envs.prepare import setup

    report = TaskReport(task.instance_id, task.kind)
    started = time.monotonic()
    config = swe.sandbox_config(base, task)
    try:
        sb = backend.create(config, {VALIDATE_LABEL: "1"})
    except SandboxError as exc:
        report.problems.append(f"sandbox: {exc}")
        return report
    gold = empty = None
    try:
        setup(sb, task, timeout, config=config, cache_root=cache_root)
        for cmd in solution_commands(task):
            r = sb.exec(cmd, timeout=timeout)
            if r.exit_code != 0:
                report.problems.append(failure(f"gold command {cmd!r}", cmd, r.exit_code, r.output))
        gold = grading.evaluate_task(sb, task, timeout, CHECK_FILE)
        report.gold = gold.reward
        # The same sandbox again, reset: validation exercises `reset` as pools do.
        sb.reset()
        setup(sb, task, timeout, config=config, cache_root=cache_root)
        empty = grading.evaluate_task(sb, task, timeout, CHECK_FILE)
        report.empty = empty.reward
        if task.kind == "swe":
            _check_tests(sb, task, timeout, report)
    except (SandboxError, swe.SetupError, OSError) as exc:
        report.problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        sb.close()
        report.seconds = time.monotonic() - started
    if not solution_commands(task):
        # Nothing to apply: "gold earns 0" would blame a solution that does not exist.
        field = "patch" if task.kind == "swe" else "solution"
        report.problems.append(f"no gold solution to prove it with: the task gives no `{field}`")
    elif report.gold != 1.0:
        report.problems.append(_verdict(f"gold solution earns {report.gold}, expected 1", task, gold))
    if report.empty != 0.0:
        report.problems.append(_verdict(f"no change earns {report.empty}, expected 0", task, empty))
    return report


def failure(what: str, command: str, exit_code: int | None, output: str, tail: int = TAIL_CHARS) -> str:
    """A failed check as a user needs it: what failed, the command, its exit code, its output's tail."""
    text = (output or "").rstrip()
    cut = f"[... {len(text) - tail} characters before ...]\n" if len(text) > tail else ""
    return f"{what}\n  $ {command}\n  exit code {exit_code}\n  output (tail):\n{cut}{text[-tail:] or '(none)'}"


def _verdict(what: str, task, result) -> str:
    if result is None:
        return what
    if task.kind != "swe":  # terminal and computer tasks: their check script
        return failure(what, f"bash -c {shlex.quote(task.check[:200])}", result.exit_code, result.test_log or "")
    status = result.tests_status or {}
    failing = [f"{k} failing: {', '.join(v['failure'])}" for k, v in status.items()
               if k in ("FAIL_TO_PASS", "PASS_TO_PASS") and v.get("failure")]
    if result.error:
        failing.append(result.error)
    what = "; ".join([what, *failing])
    return failure(what, swe.tests_command(task, [*task.FAIL_TO_PASS, *task.PASS_TO_PASS]), result.exit_code,
                   result.test_log or "")


def _check_tests(sb, task, timeout: float, report: TaskReport) -> None:
    """On the untouched repo (test patch applied): FAIL_TO_PASS fail one by one, PASS_TO_PASS pass."""
    if not task.FAIL_TO_PASS:
        report.problems.append("no FAIL_TO_PASS tests")
    for test in task.FAIL_TO_PASS:
        cmd = swe.tests_command(task, [test])
        r = sb.exec(cmd, timeout=timeout)
        if r.exit_code == 0:
            report.problems.append(failure(f"FAIL_TO_PASS test passes without the fix: {test}", cmd, r.exit_code,
                                           r.output))
    if task.PASS_TO_PASS:
        cmd = swe.tests_command(task, task.PASS_TO_PASS)
        r = sb.exec(cmd, timeout=timeout)
        if r.exit_code != 0:
            report.problems.append(failure("PASS_TO_PASS tests fail without any change", cmd, r.exit_code, r.output))


def sandbox_for(tasks_path: str | Path, backend: str | None, spec: str | Path | None = None) -> SandboxConfig:
    """The sandbox configuration a run would use: the run spec's (`spec`, or `tasks_path` when it is one).

    `backend` (``--sandbox``) overrides the spec's backend type; without a spec the
    defaults of `SandboxConfig` apply (local backend).
    """
    source = Path(spec) if spec else Path(tasks_path)
    config = SandboxConfig()
    if source.is_file() and source.suffix in (".yaml", ".yml", ".json"):
        from megaflow.spec import _read_structured

        try:
            raw = _read_structured(source)
        except (OSError, ValueError) as exc:
            raise SpecError(f"cannot read {source}: {exc}") from exc
        if isinstance(raw, dict) and ("tasks_file" in raw or "model" in raw or "agent" in raw or spec):
            config = RunSpec.load(source).sandbox
    return config.model_copy(update={"type": backend}) if backend else config


def validate(tasks: list, backend: SandboxBackend, base: SandboxConfig, cache_root: Path,
             timeout: float = 300.0) -> list[TaskReport]:
    """Validate every task in turn; a broken task never stops the others."""
    reports = []
    for task in tasks:
        report = validate_task(backend, base, task, cache_root, timeout)
        log.info("%s: %s (%.1fs)", task.instance_id, "ok" if report.ok else "; ".join(report.problems),
                 report.seconds)
        reports.append(report)
    return reports
