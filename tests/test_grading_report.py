"""Per-test results as the official harness reports them (issue #15, point 2).

MegaFlow's verdict equals ``swebench``'s own on the same logs (real ones from
sandbox runs and hand-written ones), and a real run keeps the evidence per
episode in PostgreSQL and shows it in `results`, the HTML report and the exports.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import swe_tamper
from conftest import need

from megaflow.envs import grading
from megaflow.envs.prepare import setup
from megaflow.sandbox.base import SandboxConfig

ROOT = Path(__file__).resolve().parents[1]
TASK = swe_tamper.task(Path(tempfile.mkdtemp(prefix="megaflow-report-repo-")))
F2P, P2P = TASK.FAIL_TO_PASS, TASK.PASS_TO_PASS


def official_verdict(text: str, exit_code: int | None, task) -> dict:
    """What ``swebench``'s harness reports for `text`, written as its eval script writes logs."""
    from swebench.harness.constants import END_TEST_OUTPUT, START_TEST_OUTPUT, TEST_EXIT_CODE
    from swebench.harness.grading import get_eval_report
    from swebench.types import TestSpec

    spec = TestSpec(instance_id=task.instance_id, image="", eval_script_list=[], repo="", version="",
                    FAIL_TO_PASS=task.FAIL_TO_PASS, PASS_TO_PASS=task.PASS_TO_PASS, log_parser="parse_log_pytest",
                    eval_type="pass_and_fail")
    tail = f"{TEST_EXIT_CODE}: {exit_code}\n" if exit_code is not None else ""
    with tempfile.NamedTemporaryFile("w", suffix=".log") as f:
        f.write(f"+ pytest ...\n{START_TEST_OUTPUT}\n{text}\n{END_TEST_OUTPUT}\n{tail}")
        f.flush()
        return get_eval_report(spec, {"instance_id": task.instance_id, "model_name_or_path": "m",
                                      "model_patch": "x"}, f.name, include_tests_status=True)[task.instance_id]


def _lines(status: dict[str, str]) -> str:
    return "\n".join(["=== short test summary info ===", *(f"{s} {t}" for t, s in status.items())])


SYNTHETIC = [
    ("all pass", _lines({t: "PASSED" for t in F2P + P2P}), 0),
    ("f2p fails", _lines({**{t: "FAILED" for t in F2P}, **{t: "PASSED" for t in P2P}}), 1),
    ("p2p fails", _lines({**{t: "PASSED" for t in F2P}, P2P[0]: "FAILED", **{t: "PASSED" for t in P2P[1:]}}), 1),
    ("f2p skipped", _lines({**{t: "SKIPPED" for t in F2P}, **{t: "PASSED" for t in P2P}}), 0),
    ("p2p skipped", _lines({**{t: "PASSED" for t in F2P}, **{t: "SKIPPED" for t in P2P}}), 0),
    ("f2p xfail", _lines({**{t: "XFAIL" for t in F2P}, **{t: "PASSED" for t in P2P}}), 0),
    ("one missing", _lines({t: "PASSED" for t in F2P + P2P[1:]}), 0),
    ("error", _lines({**{t: "ERROR" for t in F2P}, **{t: "PASSED" for t in P2P}}), 1),
    # A log claiming every pass while the command failed: the harness refuses it.
    ("forged passes", _lines({t: "PASSED" for t in F2P + P2P}), 1),
    ("nothing ran", "collected 0 items", 5),
]


@pytest.mark.parametrize("name,text,code", SYNTHETIC, ids=[s[0] for s in SYNTHETIC])
def test_verdict_equals_swebench_on_synthetic_logs(name, text, code):
    ours, statuses = grading.harness_report(text, code, TASK, "x")
    official = official_verdict(text, code, TASK)
    assert (ours["resolved"], ours.get("tests_status")) == (official["resolved"], official.get("tests_status"))
    assert ours["resolved"] is (name in ("all pass", "p2p skipped", "f2p xfail"))


@pytest.fixture(scope="module")
def real_logs(tmp_path_factory):
    """(agent, Evaluation) from real sandbox runs: resolved, unresolved, and gamed with restoration off."""
    from megaflow.sandbox.local import LocalBackend

    need("bubblewrap", shutil.which("bwrap") is not None, "apt-get install bubblewrap")
    backend, config = LocalBackend(tmp_path_factory.mktemp("sb")), SandboxConfig(type="local")
    out = []
    for agent, protect in [("oracle", True), ("noop", True), ("neuter", True), ("neuter", False), ("ini", False)]:
        sb = backend.create(config, {"megaflow.test": "report"})
        try:
            setup(sb, TASK, 120, config=config, cache_root=tmp_path_factory.mktemp("c"))
            for cmd in swe_tamper.AGENTS[agent]:
                assert sb.exec(cmd, timeout=60).exit_code == 0
            mp = pytest.MonkeyPatch()
            if not protect:
                swe_tamper.restoration_off(mp)
            try:
                out.append((agent, grading.evaluate(sb, TASK, 120)))
            finally:
                mp.undo()
        finally:
            sb.close()
    return out


@pytest.mark.integration
def test_verdict_equals_swebench_on_real_logs(real_logs):
    verdicts = []
    for agent, ev in real_logs:
        official = official_verdict(ev.test_log, ev.exit_code, TASK)
        assert (ev.resolved, ev.tests_status) == (official["resolved"], official["tests_status"]), agent
        verdicts.append(ev.resolved)
    assert verdicts == [True, False, False, True, True]  # restoration off: the gamed runs resolve


# -- a real run through the pipeline --------------------------------------------------


@pytest.fixture
def graded_runs(tmp_path, pg_url, amqp_vhost):
    from megaflow import Client, Settings
    from megaflow.db.schema import upgrade
    from megaflow.validate import load_task_set
    from megaflow.local_stack import WorkerProcess

    need("bubblewrap", shutil.which("bwrap") is not None, "apt-get install bubblewrap")
    settings = Settings(data_dir=tmp_path / "state", database_url=pg_url, broker_url=amqp_vhost, host="it-host")
    upgrade(pg_url)
    task = next(t for t in load_task_set(ROOT / "examples" / "tasks") if t.instance_id == "textkit-1")
    workers = [WorkerProcess(p, settings, name=p).start() for p in ("model", "agent", "env")]
    try:
        client = Client(settings)
        base = {"sandbox": {"type": "local"}, "tasks": [task.model_dump()]}
        gold = client.submit({**base, "name": "gold", "agent": {"type": "oracle"}})
        noop = client.submit({**base, "name": "noop", "model": {"type": "scripted", "replies": ["```bash\nsubmit\n```"]}})
        for run_id in (gold, noop):
            assert client.wait(run_id, timeout=180)["by_state"] == {"succeeded": 1}
        yield settings, client, gold, noop, task
    finally:
        for w in workers:
            w.stop()


@pytest.mark.integration
def test_a_run_keeps_and_shows_the_evidence(graded_runs, tmp_path):
    from megaflow.db.engine import session_scope
    from megaflow.db.models import Episode
    from megaflow.ops.report import write_report

    settings, client, gold, noop, task = graded_runs
    [g] = client.results(gold)
    [n] = client.results(noop)
    assert (g["reward"], g["resolved"], g["f2p_failure"], g["p2p_failure"]) == (1.0, True, [], [])
    assert (n["reward"], n["resolved"], n["f2p_failure"]) == (0.0, False, task.FAIL_TO_PASS)
    with session_scope(settings.resolved_database_url()) as s:
        ep = s.query(Episode).filter_by(run_id=noop).one()
        assert ep.grading["statuses"][task.FAIL_TO_PASS[0]] == "FAILED"
        assert ep.grading["patch_applied"] is True and "AssertionError" in ep.test_log
        write_report(s, noop, tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert "<h2>Grading</h2>" in html and task.FAIL_TO_PASS[0] in html

    assert client.export(noop, "swebench-report", tmp_path / "reports") == 1
    report = json.loads((tmp_path / "reports" / "textkit-1" / "report.json").read_text())
    entry = report["textkit-1"]
    assert entry["resolved"] is False and entry["tests_status"]["FAIL_TO_PASS"]["failure"] == task.FAIL_TO_PASS
    assert "FAILED" in (tmp_path / "reports" / "textkit-1" / "test_output.txt").read_text()
    assert client.export(gold, "jsonl", tmp_path / "g.jsonl") == 1
    line = json.loads((tmp_path / "g.jsonl").read_text())
    assert line["grading"]["resolved"] is True and line["test_log"]
