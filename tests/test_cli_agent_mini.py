"""mini-swe-agent itself as a CLI agent, on Docker, through the model proxy (issue 19 point 3).

The `mini-swe-agent` package is installed in a task environment image built from a
wheelhouse (`pip download` on the host; the sandbox has no network), cached by its
content tag. One run uses the scripted model (it solves the task), one the real
SmolLM2 in the model worker (its turns carry real token ids and logprobs).
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from conftest import docker_engine, need
from test_cli_agent import episode_and_steps
from test_model_queue import need_smollm2

from megaflow.agent.cli import MINI_SWE_AGENT
from megaflow.spec import Environment

pytestmark = [pytest.mark.integration, pytest.mark.cluster(host="mini-host")]

MINI = Environment(pip=["mini-swe-agent==2.4.6"])
TASK = {"instance_id": "hello", "instruction": "Write hello into hello.txt.", "check": "grep -qx hello hello.txt"}
SOLVES = ["THOUGHT: I write the file.\n\n```mswea_bash_command\necho hello > hello.txt\n```",
          "THOUGHT: Done.\n\n```mswea_bash_command\necho COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT\n```"]


@pytest.fixture
def mini_image(monkeypatch, tmp_path) -> str:
    """The environment image with mini-swe-agent (built once: cold, about 3 minutes here)."""
    import docker
    from megaflow.envs.environments import build_env_image, image_tag
    from megaflow.sandbox.contexts import context_dir
    from megaflow.sandbox.images import build_image

    client = docker.DockerClient(base_url=docker_engine(monkeypatch))
    try:
        client.images.get(image_tag(MINI))
        return image_tag(MINI)
    except docker.errors.ImageNotFound:
        pass
    build_image(client, context_dir("python"), "megaflow/python")
    wheels = tmp_path / "wheels"
    started = time.monotonic()
    got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels), *MINI.pip],
                         check=False, capture_output=True, text=True, timeout=900)
    need("the package registry", got.returncode == 0, got.stderr[-500:])
    tag = build_env_image(client, MINI, find_links=wheels)
    print(f"mini-swe-agent image {tag} built cold in {time.monotonic() - started:.0f}s")
    return tag


def spec(name: str, model: dict, *extra: str) -> dict:
    return {"name": name, "model": model, "agent": {"type": "cli", "command": " ".join((MINI_SWE_AGENT, *extra))},
            "sandbox": {"type": "docker", "memory_mb": 2048}, "limits": {"episode_timeout_s": 400},
            "tasks": [TASK]}


def test_mini_swe_agent_runs_in_the_sandbox_against_the_scripted_model_and_smollm2(mini_image, cluster):
    need_smollm2()
    client = cluster.client
    scripted = client.submit({**spec("mini-scripted", {"type": "scripted", "replies": SOLVES}),
                              "sandbox": {"type": "docker", "image": mini_image, "memory_mb": 2048}})
    smol = client.submit({**spec("mini-smollm2", {"type": "transformers", "sampling": {"max_tokens": 16}},
                                 "-c agent.step_limit=1"),
                          "sandbox": {"type": "docker", "image": mini_image, "memory_mb": 2048}})

    st = client.wait(scripted, timeout=400)
    ep, steps = episode_and_steps(client, scripted)
    assert st["by_state"] == {"succeeded": 1}, (ep.exit_status, ep.error, [(s.action, s.completion, s.observation)
                                                                          for s in steps])
    assert ep.reward == 1.0
    _launch, *turns, end = steps
    assert [t.completion for t in turns] == SOLVES
    assert "Please solve this issue: Write hello into hello.txt." in turns[0].messages_in[-1]["content"]
    assert "<returncode>0</returncode>" in turns[1].messages_in[0]["content"]  # mini's own observation template
    assert end.exit_code == 0

    st = client.wait(smol, timeout=400)
    ep, steps = episode_and_steps(client, smol)
    assert st["by_state"] == {"succeeded": 1}, (ep.exit_status, ep.error, [(s.action, s.completion, s.observation)
                                                                          for s in steps])
    [turn] = [s for s in steps if s.completion is not None]  # mini's step limit: one call
    for t in [turn]:
        assert t.model == "smollm2" and 0 < t.completion_tokens <= 16
        assert len(t.token_ids) == len(t.logprobs) == t.completion_tokens
    assert steps[-1].action == "(the agent program exited)"
