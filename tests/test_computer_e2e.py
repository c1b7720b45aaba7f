"""A computer-use episode end to end (issue #20 point 3): real workers on RabbitMQ and PostgreSQL, the
Docker desktop sandbox, the computer scaffold and a scripted model that answers with tool calls.

The model clicks into the editor, types, saves and says done; the check script
inside the desktop grades it 1. The trajectory keeps the actions and the
screenshots' references (the PNGs stay in the env host's artifact store, which the
model worker read to build each prompt), never the bytes.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select
from test_desktop import desktop_image

from megaflow.db.models import Episode, Step
from megaflow.sandbox.desktop_artifacts import ArtifactStore, refs_in
from megaflow.validate import load_task_set

pytestmark = pytest.mark.integration


def tool_call(name: str, **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def test_a_scripted_vision_model_solves_a_desktop_task_through_tool_calls(make_cluster, monkeypatch, tmp_path):
    desktop_image(monkeypatch)  # before the workers start: they inherit DOCKER_HOST
    cluster = make_cluster("cu-host")
    [task] = [t for t in load_task_set("examples/computer/tasks.yaml") if t.instance_id == "editor-save-text"]
    replies = [tool_call("click", x=400, y=300), tool_call("type", text="hello world"),
               tool_call("key", keys="ctrl+s"), "Saved. " + tool_call("done")]
    run_id = cluster.client.submit({
        "name": "computer-e2e", "tasks": [task.model_dump()],
        "model": {"type": "scripted", "replies": replies},
        "agent": {"type": "computer", "keep_screenshots": 2},
        "sandbox": {"type": "desktop"},
        "limits": {"episode_timeout_s": 240, "max_steps": 10},
    })
    st = cluster.client.wait(run_id, timeout=300)
    with cluster.client.session() as s:
        ep = s.execute(select(Episode).where(Episode.run_id == run_id)).scalar_one()
        steps = s.execute(select(Step).where(Step.episode_id == ep.id).order_by(Step.index)).scalars().all()
        s.expunge_all()
    assert st["by_state"] == {"succeeded": 1}, (ep.exit_status, ep.error, [(x.action, x.observation) for x in steps])
    assert (ep.reward, ep.exit_status) == (1.0, "submitted")

    # The first look is the scaffold's own; then one action per tool call, and done.
    assert [x.action for x in steps] == ["megaflow-desktop screenshot", "megaflow-desktop click 400 300",
                                         "megaflow-desktop type 'hello world'", "megaflow-desktop key ctrl+s",
                                         "submit"]
    assert [c["function"]["name"] for x in steps[1:] for c in x.tool_calls] == ["click", "type", "key", "done"]
    store = ArtifactStore(cluster.settings.data_dir / "artifacts")
    for x in steps[:4]:
        [ref] = refs_in(x.observation)
        assert store.get(ref)[:8] == b"\x89PNG\r\n\x1a\n"
        assert "notes.txt - Mousepad" in x.observation
    # What the scaffold added for the model: a tool answer and the screen, by reference.
    image = steps[2].messages_in[-1]["content"][1]
    assert image["image_url"]["url"] == refs_in(steps[1].observation)[0]

    out = tmp_path / "run.jsonl"
    assert cluster.client.export(run_id, "jsonl", out) == 1
    text = out.read_text()
    assert "artifact:sha256:" in text and "data:image" not in text and "megaflow-desktop key ctrl+s" in text
