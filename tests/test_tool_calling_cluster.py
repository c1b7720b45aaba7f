"""The `tools` scaffold through real workers (RabbitMQ, PostgreSQL, Celery, bubblewrap sandboxes):
a scripted model solving an example SWE task with bash, the editor and submit, graded to reward 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from megaflow.db.models import Episode, Step
from megaflow.export import episode_record
from megaflow.validate import load_task_set

pytestmark = [pytest.mark.integration, pytest.mark.cluster(host="tools-host")]
ROOT = Path(__file__).resolve().parent.parent

BUG = 'return re.sub(r"[^a-z0-9]", "-", text)'
FIX = 'return re.sub(r"[^a-z0-9]+", "-", text).strip("-")'


def call(name: str, **args) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': args})}\n</tool_call>"


def test_tools_agent_fixes_a_swe_task_with_bash_editor_and_submit(cluster):
    [task] = [t for t in load_task_set(ROOT / "examples" / "tasks") if t.instance_id == "textkit-1"]
    replies = [
        call("bash", command="grep -n 're.sub' textkit/__init__.py"),
        call("str_replace_based_edit_tool", command="view", path="textkit/__init__.py", view_range=[8, 11]),
        "I will fix it now.\n" + call("str_replace_based_edit_tool", command="str_replace",
                                      path="textkit/__init__.py", old_str=BUG, new_str=FIX),
        call("str_replace_based_edit_tool", command="create", path="notes.txt", file_text="scratch\n"),
        call("str_replace_based_edit_tool", command="undo_edit", path="notes.txt"),
        call("submit"),
    ]
    spec = {"name": "tools-swe", "agent": {"type": "tools"}, "model": {"type": "scripted", "replies": replies},
            "sandbox": {"type": "local"}, "limits": {"exec_timeout_s": 60, "eval_timeout_s": 120},
            "tasks": [task.model_dump(mode="json")]}
    client = cluster.client
    run_id = client.submit(spec)
    assert client.wait(run_id, timeout=120)["by_state"] == {"succeeded": 1}

    with client.session() as s:
        ep = s.execute(select(Episode).where(Episode.run_id == run_id)).scalar_one()
        steps = s.execute(select(Step).where(Step.episode_id == ep.id).order_by(Step.index)).scalars().all()
        record = episode_record(ep, task, steps)
    assert (ep.exit_status, ep.reward, ep.n_steps) == ("submitted", 1.0, 6)
    assert [s.tool_calls[0]["function"]["name"] for s in steps] == ["bash"] + ["str_replace_based_edit_tool"] * 4 + [
        "submit"]
    results = [m for m in record["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in results] == [s.tool_calls[0]["id"] for s in steps[:5]]
    assert results[0]["content"].startswith("[exit code 0]\n11:") and BUG in results[0]["content"]
    assert "    11\t    return re.sub" in results[1]["content"]
    assert results[2]["content"].startswith("The file ") and FIX in results[2]["content"]
    assert results[4]["content"].startswith("Undid the creation of ")
    # The patch graded is the fix alone: no scratch file, no editor history.
    assert FIX in ep.patch and "notes.txt" not in ep.patch and ".megaflow" not in ep.patch
    assert ep.grading["resolved"] is True
