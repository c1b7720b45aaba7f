"""Computer use without a desktop (issue #20): action parsing, the text view, the screenshot drop rule,
the scaffold's parse/observe, the task family's spec. Fast: no services."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megaflow.agent import Command, FormatError, Submit, make_agent
from megaflow.agent.computer import DONE, TOOLS, ComputerAgent, visible
from megaflow.agent.oracle import solution_commands
from megaflow.errors import InfraError, SpecError
from megaflow.hops import exec_journal
from megaflow.hops.exec_journal import wrap
from megaflow.model.base import Message
from megaflow.sandbox.base import ExecResult
from megaflow.sandbox.desktop import Observation, TextView, action_in, parse_text_view
from megaflow.sandbox.desktop_actions import ACTIONS, command, parse_command, to_argv
from megaflow.sandbox.desktop_artifacts import PREFIX, ArtifactStore, png_size, refs_in
from megaflow.spec import AgentConfig, RunSpec
from megaflow.validate import load_task_set

REF = PREFIX + "ab" * 32
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + (1024).to_bytes(4, "big") + (768).to_bytes(4, "big") + b"rest"


def call(name: str, args, id: str = "c1") -> dict:
    return {"id": id, "type": "function",
            "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}}


# -- actions -------------------------------------------------------------------


@pytest.mark.parametrize("name, args, argv", [
    ("screenshot", {}, ["screenshot"]),
    ("click", {"x": 10, "y": 20}, ["click", "10", "20"]),
    ("click", {"x": 10.0, "y": 20, "button": 3}, ["click", "10", "20", "3"]),
    ("double_click", {"x": 1, "y": 2}, ["double_click", "1", "2"]),
    ("drag", {"x": 1, "y": 2, "to_x": 3, "to_y": 4}, ["drag", "1", "2", "3", "4"]),
    ("type", {"text": "it's a 'test'\nline 2"}, ["type", "it's a 'test'\nline 2"]),
    ("key", {"keys": "ctrl+s"}, ["key", "ctrl+s"]),
    ("scroll", {"x": 5, "y": 6, "direction": "down"}, ["scroll", "5", "6", "down"]),
    ("wait", {"seconds": 0.5}, ["wait", "0.5"]),
])
def test_actions_become_helper_argv_and_round_trip_through_the_shell(name, args, argv):
    assert to_argv(name, args) == argv
    assert parse_command(command(name, args)) == argv


def test_several_key_combinations_are_separate_arguments():
    assert parse_command(command("key", {"keys": "ctrl+a  Delete"})) == ["key", "ctrl+a", "Delete"]


@pytest.mark.parametrize("name, args, says", [
    ("fly", {}, "unknown action 'fly'"),
    ("click", {"x": 1}, "missing argument 'y'"),
    ("click", {"x": 1, "y": 2, "z": 3}, "unexpected argument(s) z"),
    ("click", {"x": "1", "y": 2}, "x must be an integer"),
    ("click", {"x": True, "y": 2}, "x must be an integer"),
    ("click", {"x": 1.5, "y": 2}, "whole number"),
    ("click", {"x": -1, "y": 2}, "whole number"),
    ("scroll", {"x": 1, "y": 2, "direction": "sideways"}, "up, down, left, right"),
    ("type", {"text": ""}, "1 to 2000 characters"),
    ("type", {"text": "x" * 2001}, "1 to 2000 characters"),
    ("key", {"keys": "ctrl+s; rm -rf /"}, "key names"),
    ("wait", {"seconds": 99}, "from 0 to 30"),
    ("click", [1, 2], "arguments must be an object"),
])
def test_bad_actions_are_one_line_errors(name, args, says):
    with pytest.raises(ValueError) as info:
        to_argv(name, args)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_action_commands_are_recognised_plain_and_journaled_and_nothing_else():
    cmd = command("type", {"text": "a b\nc"})
    assert action_in(cmd) == action_in(wrap(cmd, "3")) == ["type", "a b\nc"]
    for plain in ("ls", wrap("ls", "1"), "megaflow-desktop launch xterm", "echo megaflow-desktop click 1 2",
                  "megaflow-desktop start", "megaflow-desktop click 1 '2"):
        assert action_in(plain) is None, plain


# -- the text view -----------------------------------------------------------------

STDERR = """0x00600003  0 10   52   484  316  host1 shell
0x00a00004  0 0    0    800  600  N/A notes.txt - Mousepad
active 0x00a00004
xdotool: something odd
--- accessibility tree ---
application 'mousepad'
  frame 'notes.txt - Mousepad' (0,0 800x600)
"""


def test_the_text_view_lists_windows_with_geometry_the_active_one_and_the_tree():
    assert parse_text_view(STDERR.replace("active 0x00a00004", str(0xa00004))).windows[1].active
    view = parse_text_view(STDERR)
    assert [(w.title, w.x, w.y, w.width, w.height, w.active) for w in view.windows] == [
        ("shell", 10, 52, 484, 316, False), ("notes.txt - Mousepad", 0, 0, 800, 600, True)]
    assert view.messages == ["xdotool: something odd"]
    assert view.accessibility.startswith("application 'mousepad'")
    text = Observation(["click", "1", "2"], 0, REF, (1024, 768), view).render()
    assert text.splitlines()[:3] == ["action: click 1 2 (ok)", "error: xdotool: something odd",
                                      f"screenshot: {REF} 1024x768"]
    assert "'notes.txt - Mousepad' at x=0 y=0 size 800x600 [active]" in text
    assert "accessibility tree:\napplication 'mousepad'" in text


def test_an_empty_desktop_and_a_failed_capture_say_so():
    text = Observation(["key", "x"], 2, None, None, TextView()).render()
    assert "(failed (2))" in text and "screenshot: none" in text and "windows: none" in text


# -- the artifact store --------------------------------------------------------------


def test_the_store_is_content_addressed(tmp_path):
    store = ArtifactStore(tmp_path)
    ref = store.put(PNG)
    assert ref == store.put(PNG) and ref.startswith(PREFIX) and len(list(tmp_path.rglob("*.png"))) == 1
    assert store.get(ref) == PNG and store.data_url(ref).startswith("data:image/png;base64,iVBORw0KGgo")
    assert png_size(PNG) == (1024, 768) and png_size(b"GIF89a") is None
    assert refs_in(f"x {ref} y {ref}") == [ref, ref]
    with pytest.raises(FileNotFoundError, match="not in the store"):
        store.get(PREFIX + "0" * 64)
    with pytest.raises(ValueError, match="not an artifact reference"):
        store.get("/etc/passwd")


# -- the drop rule -------------------------------------------------------------------


def shots(n: int) -> list[Message]:
    msgs = [Message(role="system", content="s"), Message(role="user", content="task")]
    for i in range(n):
        msgs.append(Message(role="user", content=[{"type": "text", "text": f"screen {i}"},
                                                   {"type": "image_url", "image_url": {"url": PREFIX + f"{i:064x}"}}]))
    return msgs


def test_only_the_latest_screenshots_reach_the_prompt():
    out = visible(shots(5), 2, lambda ref: "data:" + ref[-1])
    images = [p["image_url"]["url"] for m in out if isinstance(m.content, list) for p in m.content
              if p["type"] == "image_url"]
    assert images == ["data:3", "data:4"]
    notes = [p["text"] for m in out[2:5] for p in m.content if p["type"] == "text" and "left out" in p["text"]]
    assert len(notes) == 3 and PREFIX + f"{0:064x}" in notes[0] and "only the latest 2" in notes[0]
    assert out[0] == shots(0)[0] and len(out) == 7


def test_text_only_prompts_keep_no_image():
    out = visible(shots(3), 0, lambda ref: pytest.fail("nothing is resolved"))
    assert not any(p["type"] == "image_url" for m in out if isinstance(m.content, list) for p in m.content)


def test_a_screenshot_missing_on_the_model_host_is_an_infra_error(tmp_path):
    agent = ComputerAgent(keep_screenshots=1)
    with pytest.raises(InfraError, match="must share <data_dir>/artifacts"):
        agent.prompt(shots(1), tmp_path)
    ref = ArtifactStore(tmp_path / "artifacts").put(PNG)
    msgs = [Message(role="user", content=[{"type": "image_url", "image_url": {"url": ref}}])]
    assert agent.prompt(msgs, tmp_path)[0].content[0]["image_url"]["url"].startswith("data:image/png;base64,")


# -- the scaffold --------------------------------------------------------------------


def test_the_scaffold_offers_every_action_and_done_and_looks_first():
    agent = make_agent(AgentConfig(type="computer", keep_screenshots=5))
    assert isinstance(agent, ComputerAgent) and agent.keep_screenshots == 5
    assert [t["function"]["name"] for t in agent.tools] == [*ACTIONS, DONE]
    assert agent.scripted_action(None, 0) == Command("megaflow-desktop screenshot")
    assert agent.scripted_action(None, 1) is None


def test_tool_calls_become_actions_or_format_errors():
    agent = ComputerAgent()
    assert agent.parse("", [call("click", {"x": 3, "y": 4})]) == Command("megaflow-desktop click 3 4")
    assert isinstance(agent.parse("", [call(DONE, {})]), Submit)
    bad = agent.parse("", [call("click", {"x": 3}), call("done", {}, "c2")])
    assert isinstance(bad, FormatError) and "missing argument 'y'" in bad.feedback
    assert [(m.role, m.tool_call_id) for m in bad.messages] == [("tool", "c1"), ("tool", "c2")]
    assert "JSON object" in agent.parse("", [call("click", "{not json")]).feedback
    assert "Reply by calling one of the tools" in agent.parse("I will click.", None).feedback


def test_observations_answer_the_call_and_show_the_screen_by_reference():
    agent = ComputerAgent()
    result = ExecResult(exit_code=0, stdout=f"action: click 3 4 (ok)\nscreenshot: {REF} 1024x768\nwindows: none")
    tool, user = agent.observe(result, "megaflow-desktop click 3 4", [call("click", {"x": 3, "y": 4})])
    assert tool.role == "tool" and tool.tool_call_id == "c1" and REF in tool.content
    assert user.role == "user" and user.content[1] == {"type": "image_url", "image_url": {"url": REF}}
    # The scripted first look has no call to answer: one user message, then the image.
    first = agent.observe(result, "megaflow-desktop screenshot", None)
    assert [m.role for m in first] == ["user", "user"]


# -- the task family -----------------------------------------------------------------


def test_the_shipped_tasks_load_and_their_oracles_are_action_commands():
    tasks = load_task_set("examples/computer/tasks.yaml")
    assert len(tasks) >= 6 and {t.kind for t in tasks} == {"computer"}
    for task in tasks:
        commands = solution_commands(task)
        assert commands and all(action_in(c) for c in commands), task.instance_id


def test_computer_tasks_refuse_bad_oracle_actions_and_other_sandboxes():
    task = {"kind": "computer", "instance_id": "t", "instruction": "i", "check": "true"}
    with pytest.raises(SpecError, match=r"solution\[0\]: click: missing argument 'y'"):
        load_task_set_from([{**task, "solution": [{"action": "click", "x": 1}]}])
    with pytest.raises(ValueError, match="set sandbox.type to desktop"):
        RunSpec.model_validate({"tasks": [task]})
    assert RunSpec.model_validate({"tasks": [task], "sandbox": {"type": "desktop"}}).tasks[0].kind == "computer"


def load_task_set_from(tasks, tmp=None):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tasks.json"
        path.write_text(json.dumps(tasks))
        return load_task_set(path)


def test_tools_table_matches_the_helper():
    # Every action the scaffold offers is one the image's helper knows.
    helper = Path("megaflow/sandbox/dockerfiles/desktop/megaflow-desktop").read_text()
    for name in ACTIONS:
        assert f"        {name})" in helper, name
    assert TOOLS[-1]["function"]["name"] == DONE


# -- the desktop sandbox's routing, without Docker ---------------------------------


class _Inner:
    """What DesktopSandbox uses of a DockerSandbox: plain commands go here."""

    id = "c0ffee"

    def __init__(self):
        from megaflow.sandbox.base import SandboxConfig

        self._config = SandboxConfig(type="docker", max_output_bytes=4096)
        self.plain: list[str] = []

    def exec(self, cmd, timeout=60.0):
        self.plain.append(cmd)
        return ExecResult(exit_code=0, stdout="plain")


def desktop_with(tmp_path, answer):
    from megaflow.sandbox.desktop import DesktopSandbox

    sb = DesktopSandbox(_Inner(), ArtifactStore(tmp_path))
    calls = []

    def raw(argv):
        calls.append(argv)
        return answer

    sb._raw = raw
    return sb, calls


def test_actions_are_run_whole_and_their_screenshot_stored_plain_commands_pass_through(tmp_path):
    sb, calls = desktop_with(tmp_path, (0, PNG, STDERR.encode()))
    assert sb.exec("ls").stdout == "plain" and sb.inner.plain == ["ls"] and calls == []
    r = sb.exec(command("click", {"x": 1, "y": 2}), timeout=30)
    assert calls[-1] == ["timeout", "-s", "KILL", "30", "megaflow-desktop", "click", "1", "2"]
    [ref] = refs_in(r.stdout)
    assert ArtifactStore(tmp_path).get(ref) == PNG and "[active]" in r.stdout and r.exit_code == 0
    sb.exec(command("screenshot", {}), timeout=30)
    assert calls[-1][4:] == ["megaflow-observe"]  # nothing to do but look
    journaled = wrap(command("key", {"keys": "ctrl+s"}), "4")
    sb.exec(journaled, timeout=30)
    assert calls[-1][4:6] == ["bash", "-c"] and calls[-1][6] == journaled  # the journal's shell kept


def test_a_journal_replay_comes_back_as_text_and_a_killed_action_as_a_timeout(tmp_path):
    token = f"{exec_journal._TOKEN} done 0\n".encode()
    sb, _ = desktop_with(tmp_path, (0, token, b""))
    r = sb.exec(wrap(command("screenshot", {}), "2"))
    assert exec_journal.replay_of(r) == ("done", 0) and not list(tmp_path.rglob("*.png"))
    sb, _ = desktop_with(tmp_path, (137, b"", b""))
    r = sb.exec(command("wait", {"seconds": 1}), timeout=1)
    assert (r.exit_code, r.timed_out) == (124, True) and "screenshot: none" in r.stdout
