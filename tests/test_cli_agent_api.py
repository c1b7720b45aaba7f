"""The CLI agents' proxy without services: its APIs' translation, its tokens, the launch command."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import tempfile

import pytest
from sqlalchemy import select, update

from megaflow.agent.cli import CliAgent, launch_command, socket_path
from megaflow.client import as_spec
from megaflow.config import Settings
from megaflow.db.models import Episode, Step
from megaflow.hops.cli_proxy import CliProxy, episode_of, host_key, token
from megaflow.hops.routing import HOP_TASKS
from megaflow.inprocess import InProcessRunner
from megaflow.model import chat_api
from megaflow.model.chat_api import BadRequest
from megaflow.preflight import PreflightError, check_model_proxy


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


# -- a program's own tools, through the proxy and the real model hop (SQLite, no broker) --------


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=30)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.unix_path)


class _InProcessProxy(CliProxy):
    """The proxy with its model hop run here (`Task.apply`) instead of sent to the model queue."""

    def _send(self, run_id: str, episode_id: str, index: int) -> None:
        self.app.tasks[HOP_TASKS["generate"]].apply(args=(episode_id, index), throw=True)


@pytest.fixture
def proxy(sqlite_url):
    # A short data dir: the socket's path must fit in 107 bytes.
    with tempfile.TemporaryDirectory(prefix="mf-") as data_dir:
        runner = InProcessRunner(Settings(data_dir=data_dir, database_url=sqlite_url))
        server = _InProcessProxy(runner.app, runner.rt)
        server.start()
        yield runner, server
        server.loop.call_soon_threadsafe(server.loop.stop)


def _parked_episode(runner, name: str) -> str:
    """An episode of a CLI agent run whose program is running (as after its launch step)."""
    run_id, _ = runner.client._record(as_spec({
        "name": name, "agent": {"type": "cli", "command": "x"}, "sandbox": {"type": "memory"},
        "model": {"type": "scripted", "replies": [
            'Listing.<tool_call>{"name": "bash", "arguments": {"command": "ls"}}</tool_call>', "All done."]},
        "tasks": [{"instance_id": name, "instruction": "look", "check": "true"}]}))
    with runner.rt.session() as s:
        [episode_id] = s.execute(select(Episode.id).where(Episode.run_id == run_id)).scalars().all()
        s.execute(update(Episode).where(Episode.id == episode_id).values(
            state="running", parked={"cli": True, "task": {}}))
        s.add(Step(episode_id=episode_id, index=0, messages_in=[], action="(launch)"))
    return episode_id


def _post(server, episode_id: str, path: str, body: dict) -> dict:
    conn = _UnixHTTP(str(server.path))
    conn.request("POST", path, json.dumps(body), {"Authorization": f"Bearer {server.token(episode_id)}",
                                                  "Content-Type": "application/json"})
    response = conn.getresponse()
    out = json.loads(response.read())
    assert response.status == 200, out
    return out


def _steps(runner, episode_id: str) -> list[Step]:
    with runner.rt.session(readonly=True) as s:
        return s.execute(select(Step).where(Step.episode_id == episode_id).order_by(Step.index)).scalars().all()


BASH = {"name": "bash", "description": "run a command",
        "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}}


def test_an_openai_program_offers_its_tools_gets_tool_calls_and_sends_results(proxy):
    runner, server = proxy
    episode_id = _parked_episode(runner, "oa")
    messages = [{"role": "user", "content": "look"}]
    tools = [{"type": "function", "function": BASH}]
    first = _post(server, episode_id, "/v1/chat/completions", {"messages": messages, "tools": tools,
                                                                "tool_choice": "auto"})
    choice = first["choices"][0]
    # The scripted model answers with a call only when the request offers tools: these reached the model.
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Listing."
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "bash" and json.loads(call["function"]["arguments"]) == {"command": "ls"}
    # Clients send the call back re-serialised, with fields of their own: still the same conversation.
    echoed = {**call, "index": 0, "function": {"name": "bash", "arguments": '{"command":"ls"}'}}
    messages += [{"role": "assistant", "content": "Listing.", "tool_calls": [echoed]},
                 {"role": "tool", "tool_call_id": call["id"], "content": "a.txt"}]
    second = _post(server, episode_id, "/v1/chat/completions", {"messages": messages, "tools": tools})
    assert second["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": "All done."},
                                    "logprobs": None, "finish_reason": "stop"}
    _, one, two = _steps(runner, episode_id)
    assert (one.tools, one.tool_choice, one.tool_calls) == (tools, "auto", [call])
    assert two.messages_in == [{"role": "tool", "content": "a.txt", "tool_call_id": call["id"]}]


def test_an_anthropic_program_gets_tool_use_blocks_and_sends_tool_results(proxy):
    runner, server = proxy
    episode_id = _parked_episode(runner, "an")
    tools = [{"name": "bash", "description": "run a command", "input_schema": BASH["parameters"]}]
    messages = [{"role": "user", "content": "look"}]
    first = _post(server, episode_id, "/v1/messages", {"system": "sys", "messages": messages, "tools": tools,
                                                       "tool_choice": {"type": "any"}, "max_tokens": 100})
    assert first["stop_reason"] == "tool_use"
    text, use = first["content"]
    assert text == {"type": "text", "text": "Listing."}
    assert (use["type"], use["name"], use["input"]) == ("tool_use", "bash", {"command": "ls"})
    messages += [{"role": "assistant", "content": first["content"]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"], "content": "a.txt"}]}]
    second = _post(server, episode_id, "/v1/messages", {"system": "sys", "messages": messages, "tools": tools})
    assert second["content"] == [{"type": "text", "text": "All done."}] and second["stop_reason"] == "end_turn"
    _, one, two = _steps(runner, episode_id)
    assert one.tools == [{"type": "function", "function": BASH}] and one.tool_choice == "required"
    assert two.messages_in == [{"role": "tool", "content": "a.txt", "tool_call_id": use["id"]}]


@pytest.mark.parametrize("read, body", [(chat_api.openai_tools, {"tools": "bash"}),
                                        (chat_api.openai_tools, {"tools": ["bash"]}),
                                        (chat_api.openai_tool_choice, {"tool_choice": {"type": "some"}})])
def test_bad_tools_are_refused_with_a_reason(read, body):
    with pytest.raises(BadRequest):
        read(body, anthropic=True)


def test_a_data_dir_too_long_for_the_model_socket_is_refused_in_one_line(tmp_path):
    check_model_proxy(Settings(data_dir=tmp_path))  # fits
    long = Settings(data_dir="/tmp/" + "d" * 100)
    with pytest.raises(PreflightError, match=r"is 126 bytes, over the 107 .*MEGAFLOW_DATA_DIR") as caught:
        check_model_proxy(long)
    assert "\n" not in str(caught.value)
    assert len(str(socket_path("/tmp/" + "d" * 81))) == 107  # the longest that fits
