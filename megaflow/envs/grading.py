"""Grade an episode as the official SWE-bench harness does: a status per test, then the verdict.

`evaluate` takes the agent's patch, restores every file that could change the
verdict (`megaflow.envs.pristine`), applies the test patch, runs the task's tests
into a log file, parses the log into a status per test id (PASSED / FAILED /
ERROR / SKIPPED / XFAIL) with the ``swebench`` package's log parser, and grades
those statuses with ``swebench``'s own grading: the log is framed as the harness's
eval script frames it and handed to ``get_logs_eval`` and ``get_eval_report``
(`harness_report`), which also refuse a log whose exit code contradicts it. The reward is 1.0 iff the instance is resolved
(``RESOLVED_FULL``): it never comes from an exit code, except for a task that
names no test ids at all, whose test command is then its whole check.

The result (`Evaluation`) keeps the evidence: FAIL_TO_PASS / PASS_TO_PASS success
and failure lists, ``resolved``, whether the test patch applied, the per-test
statuses and the test log (capped, redacted), stored per episode.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from megaflow.deadlines import Budget
from megaflow.envs import pristine

log = logging.getLogger(__name__)

#: Exit code of the second exec when the restore's pyproject fix-ups failed.
_RESTORE_FAILED = 90
#: Where the test command's output goes in the sandbox (read back whole, then capped).
LOG_FILE = ".megaflow_test.log"
#: A log this small (with the agent's diff) comes back in the evaluation's own output, not read back.
INLINE_LOG_BYTES = 48_000
#: Where a terminal task's check script is written in the sandbox before it runs.
CHECK_FILE = ".megaflow_check.sh"
#: The part of a test log kept per episode: head and tail of this many characters.
LOG_KEEP_CHARS = 64_000
#: A log larger than this is parsed only in its last part (a runaway test printing forever).
LOG_PARSE_CHARS = 32 << 20
#: Where a parsed status map is cut in the stored record (ids of the task's lists always kept).
STATUS_KEEP = 2_000


@dataclass
class Evaluation:
    """What grading one episode found."""

    reward: float
    patch: str | None = None
    resolved: bool = False
    patch_applied: bool = True
    tests_status: dict | None = None
    statuses: dict[str, str] = field(default_factory=dict)
    test_log: str | None = None
    exit_code: int | None = None
    error: str | None = None

    def record(self) -> dict:
        """The JSON kept per episode (``episodes.grading``); the log is kept apart."""
        return {"resolved": self.resolved, "patch_applied": self.patch_applied, "tests_status": self.tests_status,
                "statuses": self.statuses, "exit_code": self.exit_code, "error": self.error}


_warm = threading.Lock()
_warmed = False


def warm_up() -> None:
    """Import ``swebench`` in a background thread, once per process.

    Its import costs a second or more (it pulls in ``datasets``): started when a SWE
    sandbox is prepared, it is done before that episode's evaluation needs it.
    """
    global _warmed
    with _warm:
        if _warmed:
            return
        _warmed = True

    def load() -> None:
        try:
            import swebench.harness.grading  # noqa: F401
            import swebench.harness.log_parsers  # noqa: F401
        except Exception:  # noqa: BLE001 - the evaluation imports it again and reports
            log.debug("warming swebench failed", exc_info=True)

    threading.Thread(target=load, name="megaflow-swebench-import", daemon=True).start()


def log_parser_name(task) -> str:
    """The ``swebench`` parser (a ``PARSER_REGISTRY`` key) for the task's repository: pytest's by default.

    The pytest-free runner prints pytest's ``-rA`` summary lines (``PASSED id``), so
    pytest's parser reads both.
    """
    from swebench.harness.log_parsers import PARSER_REGISTRY
    from swebench.harness.log_parsers.python import MAP_REPO_TO_PARSER_PY

    info = getattr(task, "swebench", None) or {}
    if info.get("log_parser") in PARSER_REGISTRY:
        return info["log_parser"]
    parser = MAP_REPO_TO_PARSER_PY.get(info.get("repo", ""))
    return parser.__name__ if parser is not None else "parse_log_pytest"


def harness_log(text: str, exit_code: int | None) -> str:
    """`text` framed as the harness's eval script frames its test output.

    The exit code goes first: ``swebench`` reads the first exit-code marker, so one
    printed by the tests themselves cannot stand in for it.
    """
    from swebench.harness.constants import END_TEST_OUTPUT, START_TEST_OUTPUT, TEST_EXIT_CODE

    head = f"{TEST_EXIT_CODE}: {exit_code}\n" if exit_code is not None else ""
    return f"{head}{START_TEST_OUTPUT}\n{text[-LOG_PARSE_CHARS:]}\n{END_TEST_OUTPUT}\n"


def harness_report(text: str, exit_code: int | None, task, patch: str | None) -> tuple[dict, dict[str, str]]:
    """(the instance's entry of ``swebench``'s ``get_eval_report``, the parsed status per test id).

    The very functions the official harness grades with, on the log framed as its
    eval script writes it: the verdict is the harness's, by construction.
    """
    import tempfile

    from swebench.harness.grading import get_eval_report, get_logs_eval
    from swebench.types import TestSpec

    info = getattr(task, "swebench", None) or {}
    spec = TestSpec(instance_id=task.instance_id, image="", eval_script_list=[], repo=info.get("repo", ""),
                    version=info.get("version", ""), FAIL_TO_PASS=list(task.FAIL_TO_PASS),
                    PASS_TO_PASS=list(task.PASS_TO_PASS), log_parser=log_parser_name(task), eval_type="pass_and_fail")
    with tempfile.NamedTemporaryFile("w", suffix=".log", prefix="megaflow-eval-") as f:
        f.write(harness_log(text, exit_code))
        f.flush()
        statuses, _found = get_logs_eval(spec, f.name)
        prediction = {"instance_id": task.instance_id, "model_name_or_path": "megaflow", "model_patch": patch or ""}
        report = get_eval_report(spec, prediction, f.name, include_tests_status=True)[task.instance_id]
    return report, statuses


def cap_log(text: str, limit: int = LOG_KEEP_CHARS) -> str:
    """Secrets redacted, then head and tail of `text` kept (the tail holds pytest's summary)."""
    from megaflow.redact import redact_text
    from megaflow.sanitize import storable

    text = redact_text(text)
    if len(text) > limit:
        head = limit // 4
        omitted = len(text) - limit
        text = f"{text[:head]}\n[... {omitted} characters omitted by megaflow ...]\n{text[-(limit - head):]}"
    return storable(text)


def _kept_statuses(statuses: dict[str, str], task) -> dict[str, str]:
    wanted = {*task.FAIL_TO_PASS, *task.PASS_TO_PASS}
    kept = {k: v for k, v in statuses.items() if k in wanted}
    for k, v in statuses.items():
        if len(kept) >= STATUS_KEEP:
            break
        kept.setdefault(k, v)
    return kept


def _tests_shell(sb, task, plan: pristine.Restore) -> str:
    """Shell, run once the restore is complete: the test patch, the runner, the tests; never exits.

    Prints `plan.mark`-framed sections: ``tp-failed`` when the test patch does not apply
    (its output on stderr), else ``code`` (the tests' exit status) and, when the log
    and the agent's diff together fit in `INLINE_LOG_BYTES`, ``log`` (the log
    itself: no read-back round trip, #15 point 7). The tests run in a subshell, so
    a test command that exits cannot cut the sections that follow.
    """
    from megaflow.envs import swe

    command = swe.tests_command(task, [*task.FAIL_TO_PASS, *task.PASS_TO_PASS])
    m = plan.mark
    return (f"if {{ {swe.test_patch_command(sb, task)}; }} >&2; then {swe.runner_command(sb, task)}; "
            f"( export PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1; {command} ) > {LOG_FILE} 2>&1; "
            f"echo {m}:code:$?; "
            f"if [ $(( $(wc -c < {LOG_FILE}) + $(wc -c < {plan.saved} 2>/dev/null || echo 0) )) -le {INLINE_LOG_BYTES} ]; "
            "then "
            f"echo {m}:log; cat {LOG_FILE}; printf '\\n'; fi; "
            f"else echo {m}:tp-failed; fi")


def evaluate(sb, task, timeout: float) -> Evaluation:
    """Grade the agent's work in `sb`; see the module docstring.

    Raises:
        SandboxError: the sandbox failed (an infra failure, not a reward of 0).
    """
    budget = Budget(timeout, "evaluation")  # `timeout` bounds the whole evaluation
    # One exec on the common path (each is a docker exec round trip, #15 point 7): the
    # agent's diff, the restore and the tests; a second only when a pyproject.toml's
    # test tables must be put back first (`pristine.Restore`).
    g = pristine.GIT
    diff_cmd = f"{g} diff --cached --binary --no-ext-diff --no-textconv"
    before = f"{g} add -A >/dev/null 2>&1; {diff_cmd} {pristine.BASE_REF} 2>/dev/null || {diff_cmd}"
    plan = pristine.Restore(task, before=before, then=lambda p: _tests_shell(sb, task, p))
    first = sb.exec(plan.command, timeout=budget.left())
    if first.timed_out:  # cut before the diff was printed: fetch it on its own
        saved = sb.exec(f"cat {plan.saved}; rm -f {plan.saved}", timeout=max(5.0, budget.left()))
        first = first.model_copy(update={"stdout": f"{first.stdout}\n{plan.mark}:before\n{saved.stdout}"})
    try:
        finish = plan.read(first.stdout)
    except pristine.BaselineMissing as exc:
        return Evaluation(0.0, plan.before_output, patch_applied=False, error=str(exc))
    patch, run, sections = plan.before_output, first, plan.sections
    if not plan.ran_then:
        run = sb.exec(f"{{ {finish}; }} || {{ echo {plan.mark}:restore-failed; exit {_RESTORE_FAILED}; }}; "
                      f"echo {plan.mark}:then; {plan.then}", timeout=budget.left())
        sections = plan.parse_sections(run.stdout)
    if "restore-failed" in sections:
        return Evaluation(0.0, patch, patch_applied=False, error=f"restoring the pristine files failed: "
                          f"{run.stderr[-300:]}")
    if "tp-failed" in sections:
        log.info("test patch of %s does not apply: %s", task.instance_id, run.stderr[-300:])
        return Evaluation(0.0, patch, patch_applied=False, error="the test patch does not apply")
    code = next((k.split(":", 1)[1] for k in sections if k.startswith("code:")), "")
    text = sections.get("log")
    if text is not None and not run.truncated:
        text = text[:-1]  # the newline printed after it
    else:
        try:
            text = sb.read_file(LOG_FILE).decode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - no log (the command never ran): graded on nothing
            text = run.output
    exit_code = int(code) if code.lstrip("-").isdigit() else None
    report, statuses = harness_report(text, exit_code, task, patch)
    resolved = bool(report.get("resolved"))
    if not task.FAIL_TO_PASS and not task.PASS_TO_PASS:
        # No test ids to grade: the test command is the whole check, its exit code the verdict.
        resolved = exit_code == 0
    if not resolved:
        log.debug("%s: not resolved: %s", task.instance_id, report)
    return Evaluation(1.0 if resolved else 0.0, patch, resolved=resolved, tests_status=report.get("tests_status"),
                      statuses=_kept_statuses(statuses, task), test_log=cap_log(text), exit_code=exit_code,
                      error="the tests timed out" if run.timed_out else report.get("infra_failure_reason"))


def evaluate_task(sb, task, timeout: float, check_file: str = CHECK_FILE) -> Evaluation:
    """Grade any task: SWE tasks by `evaluate`; terminal and computer tasks by their check script's exit code.

    Raises:
        SandboxError: the sandbox failed.
    """
    if task.kind == "swe":
        return evaluate(sb, task, timeout)
    sb.write_file(check_file, task.check.encode())
    r = sb.exec(f"bash {check_file}", timeout=timeout)
    ok = r.exit_code == 0
    return Evaluation(1.0 if ok else 0.0, None, resolved=ok, test_log=cap_log(r.output), exit_code=r.exit_code,
                      error="the check timed out" if r.timed_out else None)
