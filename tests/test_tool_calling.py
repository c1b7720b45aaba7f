"""Native tool calling without services: the parser, the shapes, each backend's pass-through
(the OpenAI client against our own `serve` server), the editor tool, and whole episodes of
the `tools` scaffold in process (SQLite, the scripted model, the memory sandbox)."""

from __future__ import annotations

import json
import subprocess
import threading

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from megaflow import Settings
from megaflow.agent import FormatError, Submit, make_agent, transcript
from megaflow.agent.tools import EDITOR, NOT_RUN, TOOLS, Command, ToolAgent, editor_command
from megaflow.db.models import Step
from megaflow.errors import MalformedResponseError
from megaflow.export import episode_record, trainer_row, write_parquet
from megaflow.hops.model_hop import conversation
from megaflow.inprocess import InProcessRunner
from megaflow.model.base import Completion, Message, ModelRequest, SamplingParams
from megaflow.model.config import OpenAIModelConfig, ScriptedModelConfig
from megaflow.model.openai_http import OpenAIModel
from megaflow.model.scripted import ScriptedModel
from megaflow.model.serve import make_server
from megaflow.model.toolcalls import chat_for_template, hermes_text, parse_tool_calls
from megaflow.sandbox.base import ExecResult
from megaflow.spec import AgentConfig


def call(name: str, **args) -> str:
    """A tool call as a Hermes-format model writes it."""
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": args})}\n</tool_call>'


# -- the parser ------------------------------------------------------------------


def test_a_hermes_call_parses_to_the_openai_shape_with_the_prose_kept():
    parsed = parse_tool_calls("Let me look.\n" + call("bash", command="ls -la"))
    assert parsed.errors == []
    assert parsed.content == "Let me look."
    [c] = parsed.calls
    assert c["type"] == "function" and c["id"].startswith("call_")
    assert c["function"]["name"] == "bash"
    assert json.loads(c["function"]["arguments"]) == {"command": "ls -la"}
    assert parse_tool_calls("Let me look.\n" + call("bash", command="ls -la")).calls == parsed.calls  # same ids


def test_several_calls_an_unclosed_last_one_and_string_arguments():
    text = (call("bash", command="ls") + '<tool_call>{"name": "submit", "arguments": "{}"}</tool_call>'
            + '<tool_call>{"name": "bash", "arguments": {"command": "pwd"}}')
    parsed = parse_tool_calls(text)
    assert [c["function"]["name"] for c in parsed.calls] == ["bash", "submit", "bash"]
    assert [json.loads(c["function"]["arguments"]) for c in parsed.calls] == [{"command": "ls"}, {}, {"command": "pwd"}]
    assert len({c["id"] for c in parsed.calls}) == 3


@pytest.mark.parametrize(("text", "error"), [
    ('<tool_call>{"name": "bash", "arguments": {"command": </tool_call>', "not valid JSON"),
    ('<tool_call>{"arguments": {}}</tool_call>', 'must be a JSON object {"name"'),
    ('<tool_call>{"name": "bash", "arguments": [1]}</tool_call>', "must be a JSON object"),
    ('<tool_call>{"name": "bash", "arguments": "not json"}</tool_call>', "are not a JSON object"),
])
def test_a_malformed_call_makes_the_reply_text_and_says_why(text, error):
    parsed = parse_tool_calls(call("bash", command="ls") + text)
    assert parsed.calls == []
    assert parsed.content == call("bash", command="ls") + text  # nothing lost
    assert len(parsed.errors) == 1 and parsed.errors[0].startswith("tool call 2: ") and error in parsed.errors[0]


def test_bare_json_and_llama3_calls_parse_but_prose_does_not():
    [c] = parse_tool_calls('<|python_tag|>{"name": "bash", "parameters": {"command": "ls"}}').calls
    assert (c["function"]["name"], json.loads(c["function"]["arguments"])) == ("bash", {"command": "ls"})
    assert len(parse_tool_calls('[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]').calls) == 2
    for prose in ('{"just": "data"}', "{not json at all", "I will run ls.", ""):
        parsed = parse_tool_calls(prose)
        assert (parsed.calls, parsed.errors, parsed.content) == ([], [], prose)


def test_calls_written_back_for_a_template_parse_again():
    calls = parse_tool_calls(call("bash", command="echo 'hi'")).calls
    assert parse_tool_calls(hermes_text("thinking", calls)).calls == parse_tool_calls(
        hermes_text("thinking", calls)).calls
    again = parse_tool_calls(hermes_text("thinking", calls))
    assert again.content == "thinking" and again.calls[0]["function"] == calls[0]["function"]


def test_a_template_without_tools_gets_them_in_the_system_prompt_and_hermes_turns():
    calls = parse_tool_calls(call("bash", command="ls")).calls
    messages = [Message(role="system", content="sys"), Message(role="user", content="task"),
                Message(role="assistant", content="", tool_calls=calls),
                Message(role="tool", content="a.txt", tool_call_id=calls[0]["id"])]
    chat = chat_for_template(messages, TOOLS, native=False)
    assert chat[0]["content"].startswith("sys\n\n# Tools") and '"name": "str_replace_based_edit_tool"' in chat[0]["content"]
    assert parse_tool_calls(chat[2]["content"]).calls[0]["function"] == calls[0]["function"]
    assert chat[3] == {"role": "user", "content": "<tool_response>\na.txt\n</tool_response>"}
    native = chat_for_template(messages, TOOLS, native=True)
    assert native[2]["tool_calls"][0]["function"]["arguments"] == {"command": "ls"}  # templates take a dict
    assert native[3]["tool_call_id"] == calls[0]["id"]


# -- the shapes ------------------------------------------------------------------


def test_tool_calls_not_in_the_openai_shape_are_refused_in_one_line():
    good = {"id": "c1", "type": "function", "function": {"name": "bash", "arguments": "{}"}}
    assert Completion(text="", tool_calls=[good]).tool_calls == [good]
    for bad in ({"function": {"name": "bash", "arguments": {}}}, {"name": "bash"},
                {**good, "type": "retrieval"}):
        with pytest.raises(ValidationError, match="tool call 0"):
            Message(role="assistant", content="", tool_calls=[bad])
    assert Message(role="user", content="x").wire() == {"role": "user", "content": "x"}


# -- backends --------------------------------------------------------------------


def test_the_scripted_model_answers_tool_calls_only_when_tools_are_offered():
    model = ScriptedModel(ScriptedModelConfig(replies=[call("bash", command="ls")]))
    asked = [Message(role="user", content="go")]
    with_tools = model.generate(ModelRequest(messages=asked, tools=TOOLS))
    assert with_tools.text == "" and with_tools.tool_calls[0]["function"]["name"] == "bash"
    without = model.generate(ModelRequest(messages=asked))
    assert without.tool_calls is None and without.text == call("bash", command="ls")


class _Recording:
    """What `serve` needs of a model: the scripted fake, recording each request it gets."""

    name = "scripted"

    def __init__(self, replies):
        self.model = ScriptedModel(ScriptedModelConfig(replies=replies))
        self.requests: list[ModelRequest] = []

    def generate(self, request):
        self.requests.append(request)
        return self.model.generate(request)

    def token_strings(self, ids):
        return [str(i) for i in ids]


@pytest.fixture
def served():
    model = _Recording([call("bash", command="ls"), "All done."])
    server = make_server(model, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = OpenAIModel(OpenAIModelConfig(endpoints=[f"http://127.0.0.1:{server.server_address[1]}/v1"],
                                           model="scripted", max_retries=0))
    yield model, client
    client.close()
    server.shutdown()
    server.server_close()


def test_openai_client_and_our_server_carry_tools_calls_and_results(served):
    model, client = served
    asked = [Message(role="system", content="sys"), Message(role="user", content="list files")]
    first = client.generate(ModelRequest(messages=asked, tools=TOOLS, tool_choice="auto",
                                         sampling=SamplingParams(logprobs=False)))
    assert first.text == "" and first.finish_reason == "tool_calls"
    [c] = first.tool_calls
    assert (c["function"]["name"], json.loads(c["function"]["arguments"])) == ("bash", {"command": "ls"})
    assert model.requests[0].tools == TOOLS and model.requests[0].tool_choice == "auto"
    # The next turn sends the call back with its result, as the model hop does.
    history = asked + [Message(role="assistant", content="", tool_calls=first.tool_calls),
                       Message(role="tool", content="a.txt", tool_call_id=c["id"])]
    second = client.generate(ModelRequest(messages=history, tools=TOOLS))
    assert (second.text, second.tool_calls, second.finish_reason) == ("All done.", None, "stop")
    got = model.requests[1].messages
    assert got[2].tool_calls == first.tool_calls and (got[3].role, got[3].tool_call_id) == ("tool", c["id"])


def test_the_openai_client_reads_calls_whatever_way_a_server_writes_arguments():
    client = OpenAIModel(OpenAIModelConfig(endpoints=["http://127.0.0.1:9/v1"], model="m"))
    as_text = {"id": "c1", "type": "function", "function": {"name": "bash", "arguments": '{"command": "ls"}'}}
    as_object = {"id": "c1", "type": "function", "function": {"name": "bash", "arguments": {"command": "ls"}}}
    for written in (as_text, as_object):
        data = {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [written]},
                             "finish_reason": "tool_calls"}]}
        done = client._completion(data, ModelRequest(messages=[], tools=TOOLS), 0.0)
        assert (done.text, done.tool_calls) == ("", [as_text])
    broken = {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [{"name": "bash"}]}}]}
    with pytest.raises(MalformedResponseError, match="tool call 0"):
        client._completion(broken, ModelRequest(messages=[], tools=TOOLS), 0.0)


# -- the scaffold ----------------------------------------------------------------


def _calls(text: str) -> list[dict]:
    return parse_tool_calls(text).calls


def test_the_scaffold_turns_calls_into_actions_and_answers_every_call():
    agent = make_agent(AgentConfig(type="tools"))
    assert isinstance(agent, ToolAgent) and agent.tools == TOOLS
    assert agent.parse("", _calls(call("bash", command="ls"))) == Command("ls")
    assert isinstance(agent.parse("", _calls(call("submit"))), Submit)
    assert agent.parse("", _calls(call(EDITOR, command="view", path="a.py"))).cmd.startswith("python3 - <<")
    two = _calls(call("bash", command="ls") + call("bash", command="pwd"))
    answers = agent.observe(ExecResult(exit_code=0, stdout="a.txt"), "ls", two)
    assert [(m.role, m.tool_call_id) for m in answers] == [("tool", two[0]["id"]), ("tool", two[1]["id"])]
    assert answers[0].content == "[exit code 0]\na.txt" and answers[1].content == NOT_RUN


@pytest.mark.parametrize(("reply", "says"), [
    ("I would run ls.", "Reply by calling one of the tools"),
    ('<tool_call>{"name": "bash", "arguments": {</tool_call>', "could not be read: tool call 1: not valid JSON"),
])
def test_a_reply_without_a_readable_call_is_a_format_error_for_the_model(reply, says):
    error = ToolAgent().parse(reply, None)
    assert isinstance(error, FormatError) and says in error.feedback and error.messages == ()


@pytest.mark.parametrize(("reply", "says"), [
    (call("rm_rf"), "Unknown tool 'rm_rf'"),
    (call("bash"), "bash needs a non-empty string argument `command`"),
    (call(EDITOR, command="delete", path="a"), "needs `command` (one of view, create"),
])
def test_a_bad_call_is_answered_by_tool_messages_for_every_call(reply, says):
    calls = _calls(reply + call("submit"))
    error = ToolAgent().parse("", calls)
    assert isinstance(error, FormatError) and says in error.feedback
    assert [(m.role, m.tool_call_id) for m in error.messages] == [("tool", c["id"]) for c in calls]
    assert error.messages[1].content == NOT_RUN


# -- the editor, run as the sandbox runs it ---------------------------------------


def _edit(workdir, **args) -> tuple[int, str]:
    """Run the editor's command through bash in `workdir`, as a sandbox's exec does."""
    # The system's python3, as in a sandbox (a version manager's shim would only add start-up time).
    done = subprocess.run(["bash", "-c", editor_command(args)], cwd=workdir, capture_output=True, text=True, check=False,
                          timeout=30, env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"})
    return done.returncode, done.stdout + done.stderr


def test_editor_commands_and_undo(tmp_path):
    (tmp_path / "pkg").mkdir()
    assert _edit(tmp_path, command="create", path="pkg/m.py", file_text="a = 1\nb = 2\n") == (
        0, f"File created at {tmp_path}/pkg/m.py.\n")
    code, out = _edit(tmp_path, command="view", path=str(tmp_path / "pkg/m.py"))
    assert code == 0 and "     1\ta = 1\n     2\tb = 2" in out
    assert "pkg/m.py" in _edit(tmp_path, command="view", path=".")[1]
    code, out = _edit(tmp_path, command="str_replace", path="pkg/m.py", old_str="b = 2", new_str="b = 3")
    assert code == 0 and "     2\tb = 3" in out
    assert _edit(tmp_path, command="insert", path="pkg/m.py", insert_line=0, new_str="# top")[0] == 0
    assert (tmp_path / "pkg/m.py").read_text() == "# top\na = 1\nb = 3\n"
    code, out = _edit(tmp_path, command="view", path="pkg/m.py", view_range=[2, 3])
    assert code == 0 and "     2\ta = 1\n     3\tb = 3" in out and "# top" not in out
    # Mistakes exit 1 with one Error line, and change nothing.
    for args, says in [({"command": "str_replace", "old_str": "nowhere", "new_str": "x"}, "did not appear verbatim"),
                       ({"command": "create", "file_text": "x"}, "already exists"),
                       ({"command": "insert", "insert_line": 99, "new_str": "x"}, "insert_line must be between 0")]:
        code, out = _edit(tmp_path, path="pkg/m.py", **args)
        assert code == 1 and out.startswith("Error: ") and says in out
    assert (tmp_path / "pkg/m.py").read_text() == "# top\na = 1\nb = 3\n"
    # Undo walks back through insert, str_replace and create.
    assert _edit(tmp_path, command="undo_edit", path="pkg/m.py")[0] == 0
    assert (tmp_path / "pkg/m.py").read_text() == "a = 1\nb = 3\n"
    assert _edit(tmp_path, command="undo_edit", path="pkg/m.py")[0] == 0
    assert (tmp_path / "pkg/m.py").read_text() == "a = 1\nb = 2\n"
    assert _edit(tmp_path, command="undo_edit", path="pkg/m.py")[0] == 0
    assert not (tmp_path / "pkg/m.py").exists()
    assert _edit(tmp_path, command="undo_edit", path="pkg/m.py")[0] == 1
    # Its history never shows in a patch.
    assert (tmp_path / ".megaflow/.gitignore").read_text() == "*\n"


def test_the_editor_takes_any_text_and_refuses_a_call_too_large_for_one_command(tmp_path):
    text = "say 'hi' \"there\" $HOME `x` \\n é\nMEGAFLOW_EDITOR\n" + "x" * 100_000 + "\n"
    assert _edit(tmp_path, command="create", path="f.txt", file_text=text)[0] == 0
    assert (tmp_path / "f.txt").read_text() == text
    too_big = ToolAgent().parse("", _calls(call(EDITOR, command="create", path="g.txt", file_text="x" * 130_000)))
    assert isinstance(too_big, FormatError) and "too large" in too_big.feedback


# -- whole episodes in process ----------------------------------------------------


@pytest.fixture
def runner(tmp_path, sqlite_url):
    return InProcessRunner(Settings(data_dir=tmp_path, database_url=sqlite_url))


def _spec(replies, **limits):
    return {"name": "tools", "agent": {"type": "tools"}, "model": {"type": "scripted", "replies": replies},
            "sandbox": {"type": "memory"}, "limits": limits,
            "tasks": [{"instance_id": "t", "instruction": "write out.txt", "check": "test -f out.txt"}]}


def _steps(runner):
    with runner.rt.session(readonly=True) as s:
        return s.execute(select(Step).order_by(Step.index)).scalars().all()


def test_an_episode_acts_through_tool_calls_and_records_them(runner):
    replies = [call("bash", command="echo hi > out.txt"),
               '<tool_call>{"name": "bash", "arguments": {"command": </tool_call>',
               call("nope") + call("bash", command="true"), call("submit")]
    [out] = runner.run(_spec(replies))
    assert (out.state, out.exit_status, out.reward) == ("succeeded", "submitted", 1.0)
    steps = _steps(runner)
    assert [s.tool_calls[0]["function"]["name"] if s.tool_calls else None for s in steps] == [
        "bash", None, "nope", "submit"]
    messages = transcript(steps)
    roles = [m["role"] for m in messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "user", "assistant", "tool", "tool",
                     "assistant"]
    assert messages[3] == {"role": "tool", "content": "[exit code 0]\n", "tool_call_id": steps[0].tool_calls[0]["id"]}
    assert "not valid JSON" in messages[5]["content"]
    assert [m["tool_call_id"] for m in messages[7:9]] == [c["id"] for c in steps[2].tool_calls]
    # The model hop gives the model its own calls back, each answered by the tool messages after it.
    with runner.rt.session(readonly=True) as s:
        sent = conversation(s, steps[0].episode_id, 3)
    assert [m.model_dump(exclude_none=True) for m in sent] == messages[:-1]
    record = episode_record(*_episode(runner, steps))
    assert record["messages"] == messages and record["steps"][0]["tool_calls"] == steps[0].tool_calls
    assert record["format_errors"] == 2


def test_format_errors_end_a_tools_episode_as_they_end_the_others(runner):
    [out] = runner.run(_spec([call("nope")], max_format_errors=1))
    assert (out.state, out.exit_status) == ("failed", "format_errors")


def test_the_trainer_row_and_parquet_keep_calls_and_results_in_their_messages(runner, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    runner.run(_spec([call("bash", command="echo hi > out.txt"), call("submit")]))
    steps = _steps(runner)
    row = trainer_row(*_episode(runner, steps))
    assert row["messages"][2]["tool_calls"] == steps[0].tool_calls
    assert row["messages"][3]["tool_call_id"] == steps[0].tool_calls[0]["id"]
    assert row["completion_token_ids"] == [s.token_ids for s in steps]
    write_parquet(tmp_path / "t.parquet", iter([row]))
    [back] = pq.read_table(tmp_path / "t.parquet").to_pylist()
    assert back["messages"][2]["tool_calls"] == steps[0].tool_calls
    assert back["messages"][3]["tool_call_id"] == steps[0].tool_calls[0]["id"]
    assert back["messages"][0]["tool_calls"] is None


def _episode(runner, steps):
    from megaflow.db.models import Episode, TaskInstance

    with runner.rt.session(readonly=True) as s:
        ep = s.get(Episode, steps[0].episode_id)
        ti = s.get(TaskInstance, ep.task_instance_id)
        s.expunge_all()
    return ep, ti, steps
