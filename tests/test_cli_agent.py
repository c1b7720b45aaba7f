"""CLI agents (issue 19 point 3): a program in the sandbox drives the model through the proxy.

Real workers on RabbitMQ and PostgreSQL, the local (bubblewrap) sandbox, and a tiny
agent program in Python that speaks OpenAI Chat Completions over the sandbox's
loopback: every call it makes is a recorded turn, its exit ends the episode in
grading, and a program that never exits is stopped at the episode's deadline, or at
once when its run is cancelled.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from megaflow.db.models import Episode, Step

pytestmark = [pytest.mark.integration, pytest.mark.cluster(host="cli-host")]

#: A minimal agent with its own loop: ask, run the bash block, report, until it submits.
AGENT = r'''
import json, os, re, subprocess, urllib.request

def ask(messages):
    req = urllib.request.Request(os.environ["OPENAI_BASE_URL"] + "/chat/completions",
                                 data=json.dumps({"model": "any", "messages": messages}).encode(),
                                 headers={"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"],
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)["choices"][0]["message"]["content"]

messages = [{"role": "system", "content": "You run bash."}, {"role": "user", "content": os.environ["MEGAFLOW_TASK"]}]
while True:
    reply = ask(messages)
    messages.append({"role": "assistant", "content": reply})
    cmd = re.search(r"```bash\n(.*?)\n```", reply, re.S).group(1)
    if cmd.strip() == "submit":
        break
    out = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    messages.append({"role": "user", "content": out.stdout + out.stderr})
print("agent done after", len(messages), "messages")
'''


def spec(name: str, command: str, replies: list[str], timeout_s: float = 120.0) -> dict:
    return {
        "name": name,
        "model": {"type": "scripted", "replies": replies},
        "agent": {"type": "cli", "command": command},
        "sandbox": {"type": "local"},
        "limits": {"episode_timeout_s": timeout_s},
        "tasks": [{"instance_id": name, "instruction": "Write hello into hello.txt.", "files": {"agent.py": AGENT},
                   "check": "grep -qx hello hello.txt"}],
    }


def episode_and_steps(client, run_id: str):
    with client.session() as s:
        [ep] = s.execute(select(Episode).where(Episode.run_id == run_id)).scalars().all()
        steps = s.execute(select(Step).where(Step.episode_id == ep.id).order_by(Step.index)).scalars().all()
        s.expunge_all()
    return ep, steps


def test_a_cli_agent_program_calls_the_model_through_the_proxy_and_is_graded(cluster):
    client = cluster.client
    solved = client.submit(spec("cli-solves", "python3 agent.py", [
        "I will write it.\n```bash\necho hello > hello.txt && cat hello.txt\n```", "Done.\n```bash\nsubmit\n```"]))
    # A program that never exits: the episode's deadline ends it (and kills it with its sandbox).
    stuck = client.submit(spec("cli-stuck", "sleep 600", ["never asked"], timeout_s=4.0))

    st = client.wait(solved, timeout=120)
    ep, steps = episode_and_steps(client, solved)
    assert st["by_state"] == {"succeeded": 1}, (ep.exit_status, ep.error, [(s.action, s.observation) for s in steps])
    assert (ep.reward, ep.exit_status) == (1.0, "submitted")
    launch, first, second, end = steps
    assert "runner.py" in launch.action and "MEGAFLOW_TOKEN" not in launch.action  # the token is never stored
    # Each call is a turn: what the program added to the conversation, the model's reply, its tokens.
    assert [m["role"] for m in first.messages_in] == ["system", "user"]
    assert first.messages_in[1]["content"] == "Write hello into hello.txt."
    assert first.completion.startswith("I will write it.") and first.completion_tokens > 0
    assert [m["content"] for m in second.messages_in] == ["hello\n"]  # only the new message
    assert second.completion.startswith("Done.")
    assert (end.action, end.exit_code) == ("(the agent program exited)", 0)
    assert "agent done after 5 messages" in end.observation
    assert ep.tokens == sum(s.prompt_tokens + s.completion_tokens for s in (first, second))

    st = client.wait(stuck, timeout=60)
    assert st["by_state"] == {"failed": 1}, st
    ep, steps = episode_and_steps(client, stuck)
    assert ep.exit_status == "time_limit" and ep.reward == -0.5
    assert steps[-1].action == "(the episode's deadline passed)"


def _running(marker: str) -> bool:
    """Whether a process of this host has `marker` in its command line (the sandbox's are visible here)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "cmdline").read_bytes():
                return True
        except OSError:  # ended meanwhile, or not ours to read
            continue
    return False


def test_cancelling_a_run_ends_its_running_program_at_once(cluster):
    client = cluster.client
    marker = f"mf-cancel-{uuid.uuid4().hex}"
    run_id = client.submit(spec("cli-cancel", f'python3 -c "import time; time.sleep(600)" {marker}', ["never asked"],
                                timeout_s=600.0))
    t0 = time.monotonic()
    while not _running(marker):  # the program started in its sandbox, and its episode parked
        assert time.monotonic() - t0 < 30, "the agent program never started"
        time.sleep(0.2)
    while not episode_and_steps(client, run_id)[0].parked:
        assert time.monotonic() - t0 < 30, "the episode never parked"
        time.sleep(0.2)

    assert client.cancel(run_id) == {"pending": 0, "waiting": 0, "running": 1}
    t1 = time.monotonic()
    st = client.wait(run_id, timeout=20)
    assert st["by_state"] == {"cancelled": 1}, st
    ep, steps = episode_and_steps(client, run_id)
    assert (ep.exit_status, ep.parked) == ("cancelled", None)
    assert steps[-1].action == "(the run was cancelled)"
    while _running(marker):  # destroyed with its sandbox
        assert time.monotonic() - t1 < 10, "the agent program outlived its cancelled episode"
        time.sleep(0.2)
    assert time.monotonic() - t1 < 10  # not at its deadline, 600 s away
