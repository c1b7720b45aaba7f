"""Grading evidence in the official SWE-bench harness's shapes (issue #15, point 2).

``megaflow export RUN --format swebench-report DIR`` writes, per SWE task instance
(its first finished sample, as the ``swebench`` predictions export picks it),
``DIR/<instance_id>/report.json`` in the shape ``swebench.harness.grading.get_eval_report``
returns, and the test log beside it as ``test_output.txt``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from megaflow.db import states

_EMPTY = {"success": [], "failure": []}


def grading_summary(grading: dict | None) -> dict:
    """Flat fields for tables and rows: resolved, patch applied, failing FAIL_TO_PASS / PASS_TO_PASS ids."""
    grading = grading or {}
    status = grading.get("tests_status") or {}
    return {
        "resolved": grading.get("resolved"),
        "patch_applied": grading.get("patch_applied"),
        "f2p_failure": (status.get("FAIL_TO_PASS") or _EMPTY)["failure"],
        "p2p_failure": (status.get("PASS_TO_PASS") or _EMPTY)["failure"],
        "per_test": bool(status),  # False for a terminal task's check: no test ids to show
    }


def report(instance_id: str, patch: str | None, grading: dict | None) -> dict:
    """One instance's ``report.json``, as the official harness writes it."""
    grading = grading or {}
    status = grading.get("tests_status") or {}
    entry = {
        "patch_is_None": patch is None,
        "patch_exists": bool(patch),
        "patch_successfully_applied": bool(grading.get("patch_applied")) and grading.get("tests_status") is not None,
        "resolved": bool(grading.get("resolved")),
    }
    if status:
        entry["tests_status"] = {k: status.get(k) or dict(_EMPTY)
                                 for k in ("FAIL_TO_PASS", "PASS_TO_PASS", "FAIL_TO_FAIL", "PASS_TO_FAIL")}
    return {instance_id: entry}


def reports(episodes) -> Iterator[tuple[str, dict, str | None]]:
    """(instance id, report, test log) per SWE instance: its first finished sample."""
    seen: set[str] = set()
    for ep, ti, _steps in episodes:
        if ti.kind != "swe" or ep.state not in states.DONE or ti.instance_id in seen:
            continue
        seen.add(ti.instance_id)
        yield ti.instance_id, report(ti.instance_id, ep.patch, ep.grading), ep.test_log


def write_reports(out_dir: Path, episodes) -> int:
    """``<out_dir>/<instance_id>/report.json`` (and ``test_output.txt``) per instance; returns how many."""
    n = 0
    for instance_id, rep, log in reports(episodes):
        target = out_dir / instance_id.replace("/", "__")
        target.mkdir(parents=True, exist_ok=True)
        (target / "report.json").write_text(json.dumps(rep, indent=4))
        (target / "test_output.txt").write_text(log or "")
        n += 1
    return n
