"""How episodes end, through real workers on the real RabbitMQ and PostgreSQL.

Every limit is driven by a scripted model: each ending is recorded as the
episode's exit status, and an agent that never submits gets the spec's penalty.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from megaflow import Client
from megaflow.agent.miniswe import FORMAT_ERROR_TEMPLATE, render, to_minisweagent_trajectory
from megaflow.db.models import Episode, Step

pytestmark = [pytest.mark.integration, pytest.mark.cluster(host="it-host")]

ECHO = "```bash\necho {step}\n```"


def spec(name: str, replies: list[str], limits: dict | None = None, agent: dict | None = None,
         sandbox: dict | None = None, latency: float = 0.0, check: str = "true") -> dict:
    return {
        "name": name,
        "model": {"type": "scripted", "replies": replies, "latency_s": latency},
        "agent": agent or {"type": "bash"},
        "sandbox": sandbox or {"type": "memory"},
        "limits": limits or {},
        "tasks": [{"instance_id": name, "instruction": f"task {name}", "check": check}],
    }


def episode_and_steps(client: Client, run_id: str) -> tuple[Episode, list[Step]]:
    with client.session() as s:
        [ep] = s.execute(select(Episode).where(Episode.run_id == run_id)).scalars().all()
        steps = s.execute(select(Step).where(Step.episode_id == ep.id).order_by(Step.index)).scalars().all()
        s.expunge_all()
    return ep, steps


def test_limits_end_episodes_with_their_exit_status_and_the_penalty(cluster):
    client = Client(cluster.settings)
    runs = {
        # Exit codes 0, 1, 2: each must reach the model in the next prompt.
        "step_limit": spec("steps", ["```bash\nexit {step}\n```"], {"max_steps": 3, "no_submit_penalty": -0.25}),
        "format_errors": spec("format", ["I think I will just talk."], {"max_format_errors": 2}),
        "token_limit": spec("tokens", [ECHO], {"max_tokens": 50}),
        "time_limit": spec("time", [ECHO], {"episode_timeout_s": 1.0, "max_steps": 1000}, latency=0.3),
        # 1.3 MB of output kept whole: the next prompt overflows the scripted model's context.
        "context_length": spec("context", ["```bash\nseq 1 200000\n```"],
                               agent={"type": "bash", "max_observation_chars": 1_000_000},
                               sandbox={"type": "memory", "max_output_bytes": 2_000_000}),
    }
    ids = {ending: client.submit(s) for ending, s in runs.items()}
    for ending, run_id in ids.items():
        st = client.wait(run_id, timeout=120)
        assert st["by_state"] == {"failed": 1}, (ending, st)
        ep, steps = episode_and_steps(client, run_id)
        assert ep.exit_status == ending
        assert ep.reward == (-0.25 if ending == "step_limit" else -0.5), ending
        assert ep.finished_at is not None
        assert all(s.action != "submit" for s in steps)

    ep, steps = episode_and_steps(client, ids["step_limit"])
    assert ep.n_steps == 3 and len(steps) == 3
    assert [s.exit_code for s in steps] == [0, 1, 2]
    assert [s.messages_in[0]["content"] for s in steps[1:]] == ["[exit code 0]\n", "[exit code 1]\n"]

    ep, steps = episode_and_steps(client, ids["format_errors"])
    assert ep.format_errors == 3 and len(steps) == 3
    assert all(s.action is None and s.exit_code is None for s in steps)
    feedback = steps[0].observation
    assert "exactly one ```bash block; found 0" in feedback
    assert [s.messages_in for s in steps[1:]] == [[{"role": "user", "content": feedback}]] * 2

    ep, steps = episode_and_steps(client, ids["token_limit"])
    assert ep.tokens > 50 and len(steps) == 1

    ep, steps = episode_and_steps(client, ids["time_limit"])
    assert len(steps) < 10  # none at all if provisioning itself outlived the deadline

    ep, steps = episode_and_steps(client, ids["context_length"])
    assert ep.state == "failed" and "exceeds" in ep.error and len(steps) == 2
    assert len(steps[1].messages_in[0]["content"]) > 1_000_000


def test_miniswe_scaffold_runs_an_episode_to_submission(cluster):
    client = Client(cluster.settings)
    replies = [
        "THOUGHT: look first.\n\n```bash\nls nope\n```",
        "Two at once:\n```bash\nls\n```\n```bash\npwd\n```",
        "```bash\necho hi > done.txt\n```",
        "THOUGHT: done.\n\n```bash\necho COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT && cat done.txt\n```",
    ]
    through_output = client.submit(spec("mini", replies, agent={"type": "miniswe"}, sandbox={"type": "local"},
                                        check='test "$(cat done.txt)" = hi'))
    bare = client.submit(spec("mini-bare", ["```bash\necho COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT\n```"],
                              agent={"type": "miniswe"}))
    assert client.wait(through_output, timeout=120)["by_state"] == {"succeeded": 1}
    assert client.wait(bare, timeout=120)["by_state"] == {"succeeded": 1}

    ep, steps = episode_and_steps(client, through_output)
    assert (ep.exit_status, ep.reward, ep.n_steps) == ("submitted", 1.0, 4)
    assert steps[0].messages_in[1]["content"].startswith("Please solve this issue: task mini\n")
    assert steps[1].messages_in[0]["content"].startswith("<returncode>2</returncode>\n<output>\n")
    assert [(m["role"], m["content"]) for m in steps[2].messages_in] == [
        ("user", render(FORMAT_ERROR_TEMPLATE, actions=["ls", "pwd"]))]
    # The submitting command ran in the sandbox and stays recorded as the action.
    assert steps[3].action == "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT && cat done.txt"
    traj = to_minisweagent_trajectory(ep, steps, instance_id="mini")
    assert traj["info"]["exit_status"] == "Submitted" and traj["info"]["submission"] == "hi\n"
    assert [m["role"] for m in traj["messages"]] == ["system", "user"] + ["assistant", "user"] * 3 + [
        "assistant", "exit"]

    ep, steps = episode_and_steps(client, bare)
    assert (ep.exit_status, ep.n_steps, steps[0].action) == ("submitted", 1, "submit")
