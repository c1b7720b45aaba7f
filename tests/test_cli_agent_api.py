"""The CLI agents' proxy without services: its APIs' translation, its tokens, the launch command."""

from __future__ import annotations

import base64
import json

import pytest

from megaflow.agent.cli import CliAgent, launch_command
from megaflow.hops.cli_proxy import episode_of, host_key, token
from megaflow.model import chat_api
from megaflow.model.chat_api import BadRequest


def test_openai_requests_become_messages_and_turns_become_responses():
    messages = chat_api.openai_messages({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "bash", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]})
    assert [(m.role, m.content) for m in messages] == [("system", "be brief"), ("user", "ab"), ("assistant", ""),
                                                        ("tool", "ok")]
    out = chat_api.openai_response({"completion": "hi", "finish_reason": "length", "prompt_tokens": 3,
                                    "completion_tokens": 2}, "m")
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["total_tokens"] == 5
    stream = chat_api.openai_stream(out).decode()
    assert stream.endswith("data: [DONE]\n\n") and json.loads(stream.split("\n")[0][6:])["choices"][0]["delta"]


def test_anthropic_requests_and_responses_translate_tool_use_both_ways():
    messages = chat_api.anthropic_messages({"system": "sys", "messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "text", "text": "running"},
                                          {"type": "tool_use", "id": "t1", "name": "bash", "input": {"cmd": "ls"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "a.txt"}]}]})
    assert [m.role for m in messages] == ["system", "user", "assistant", "tool"]
    assert json.loads(messages[2].tool_calls[0]["function"]["arguments"]) == {"cmd": "ls"}
    assert messages[3].tool_call_id == "t1"
    out = chat_api.anthropic_response({"completion": "x", "tool_calls": [
        {"id": "t2", "type": "function", "function": {"name": "bash", "arguments": '{"cmd": "pwd"}'}}]}, "m")
    assert out["stop_reason"] == "tool_use" and out["content"][1]["input"] == {"cmd": "pwd"}


@pytest.mark.parametrize("body", [{}, {"messages": []}, {"messages": [{"role": "wizard", "content": "x"}]},
                                  {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}])
def test_bad_requests_are_refused_with_a_reason(body):
    with pytest.raises(BadRequest):
        chat_api.openai_messages(body)


def test_tokens_speak_for_one_episode_only(tmp_path):
    key = host_key(tmp_path)
    assert host_key(tmp_path) == key and (tmp_path / "cli-proxy.key").stat().st_mode & 0o077 == 0
    good = token(key, "ep1")
    assert episode_of(key, f"Bearer {good}") == "ep1"
    forged = "ep2." + good.partition(".")[2]
    assert episode_of(key, f"Bearer {forged}") is None and episode_of(key, None) is None
    assert episode_of(host_key(tmp_path / "other"), f"Bearer {good}") is None


def test_the_launch_command_carries_the_program_and_task_but_no_token():
    cmd = launch_command("echo 'it''s' \"$X\"", 4100, "do it; rm -rf /")
    config = json.loads(base64.b64decode(cmd.rsplit(" ", 1)[1]))
    assert config == {"command": "echo 'it''s' \"$X\"", "port": 4100, "task": "do it; rm -rf /"}
    assert "MEGAFLOW_TOKEN" not in cmd
    agent = CliAgent("x")
    assert agent.scripted_action(type("T", (), {"kind": "terminal", "instruction": "i"})(), 1) is None
