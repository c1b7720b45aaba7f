"""Prove a task set, as SWE-bench validates gold patches: gold solution → reward 1, no change → reward 0.

Each task runs directly in a sandbox of the chosen backend, through the same
`setup` and `evaluate` functions the env hops use, without the queueing pipeline
(the oracle agent's commands are those of `megaflow.agent.oracle`). For SWE tasks it
also checks each FAIL_TO_PASS test fails and the PASS_TO_PASS tests pass on the
untouched repo, so a reward of 0 there means "the bug is present", not "the
task is broken".
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from megaflow.agent.oracle import solution_commands
from megaflow.envs import swe
from megaflow.errors import SandboxError, SpecError
from megaflow.sandbox.base import SandboxBackend, SandboxConfig
from megaflow.spec import RunSpec, TaskSpec, format_errors, load_tasks

log = logging.getLogger(__name__)

#: Label on validation sandboxes (no host label: the reaper leaves them to us).
VALIDATE_LABEL = "megaflow.validate"


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
    from megaflow.hops.env_hop import evaluate, setup

    report = TaskReport(task.instance_id, task.kind)
    started = time.monotonic()
    config = swe.sandbox_config(base, task)
    try:
        sb = backend.create(config, {VALIDATE_LABEL: "1"})
    except SandboxError as exc:
        report.problems.append(f"sandbox: {exc}")
        return report
    try:
        setup(sb, task, timeout, config=config, cache_root=cache_root)
        for cmd in solution_commands(task):
            r = sb.exec(cmd, timeout=timeout)
            if r.exit_code != 0:
                report.problems.append(f"gold command exited {r.exit_code}: {(r.stderr or r.stdout)[-300:]}")
        report.gold, _ = evaluate(sb, task, timeout)
        # The same sandbox again, reset: validation exercises `reset` as pools do.
        sb.reset()
        setup(sb, task, timeout, config=config, cache_root=cache_root)
        report.empty, _ = evaluate(sb, task, timeout)
        if task.kind == "swe":
            _check_tests(sb, task, timeout, report)
    except (SandboxError, swe.SetupError, OSError) as exc:
        report.problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        sb.close()
        report.seconds = time.monotonic() - started
    if report.gold != 1.0:
        report.problems.append(f"gold solution earns {report.gold}, expected 1")
    if report.empty != 0.0:
        report.problems.append(f"no change earns {report.empty}, expected 0")
    return report


def _check_tests(sb, task, timeout: float, report: TaskReport) -> None:
    """On the untouched repo (test patch applied): FAIL_TO_PASS fail one by one, PASS_TO_PASS pass."""
    if not task.FAIL_TO_PASS:
        report.problems.append("no FAIL_TO_PASS tests")
    for test in task.FAIL_TO_PASS:
        if sb.exec(swe.tests_command(task, [test]), timeout=timeout).exit_code == 0:
            report.problems.append(f"FAIL_TO_PASS test passes without the fix: {test}")
    if task.PASS_TO_PASS:
        r = sb.exec(swe.tests_command(task, task.PASS_TO_PASS), timeout=timeout)
        if r.exit_code != 0:
            report.problems.append(f"PASS_TO_PASS tests fail without any change:\n{r.stdout[-800:]}")


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
