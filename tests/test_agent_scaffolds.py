"""Scaffolds without services: prompts, parsing, submit detection, observations, trajectories."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jinja2
import pytest

from megaflow.agent import Command, FormatError, Submit, make_agent, transcript
from megaflow.agent.base import truncate_middle
from megaflow.agent.bash import BashAgent
from megaflow.agent.miniswe import (
    FORMAT_ERROR_TEMPLATE,
    INSTANCE_TEMPLATE,
    SYSTEM_TEMPLATE,
    MiniSweAgent,
    render,
    submission_of,
    to_minisweagent_trajectory,
)
from megaflow.sandbox.base import ExecResult
from megaflow.spec import AgentConfig, SWETask, TerminalTask

TASK = TerminalTask(instance_id="t", instruction="Make the tests pass.", check="true")


def test_make_agent_builds_each_scaffold():
    assert isinstance(make_agent(AgentConfig(type="miniswe")), MiniSweAgent)
    assert type(make_agent(AgentConfig(type="bash"))) is BashAgent
    agent = make_agent(AgentConfig(type="miniswe", max_observation_chars=300, system_prompt="Solve {{task}}"))
    assert agent.max_observation_chars == 300
    assert agent.start(TASK)[0].content == "Solve Make the tests pass."


# -- mini-swe-agent: prompts --------------------------------------------------------


def test_miniswe_prompts_are_its_templates_rendered_with_the_task():
    system, user = MiniSweAgent().start(TASK)
    assert (system.role, user.role) == ("system", "user")
    assert system.content == SYSTEM_TEMPLATE.removesuffix("\n")  # Jinja drops a template's last newline
    assert "exactly ONE bash code block" in system.content and "```bash\nyour_command_here\n```" in system.content
    assert user.content.startswith("Please solve this issue: Make the tests pass.\n")
    assert "`echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT`" in user.content
    assert "{{" not in user.content and "{{task}}" in INSTANCE_TEMPLATE


def test_miniswe_uses_the_problem_statement_of_swe_tasks():
    task = SWETask(instance_id="repo__1", problem_statement="Fix the off-by-one in range().")
    assert "Please solve this issue: Fix the off-by-one in range()." in MiniSweAgent().start(task)[1].content


def test_render_is_jinja_with_undefined_names_an_error():
    assert render("a {{x}} b {{ y }}", x=1, y="two") == "a 1 b two"
    assert render("{{ xs|length }} {{x}}", xs=[1, 2], x="{{x}}") == "2 {{x}}"
    with pytest.raises(jinja2.UndefinedError):
        render("{{missing}}")


# -- mini-swe-agent: actions ----------------------------------------------------------


def test_miniswe_parses_exactly_one_bash_block():
    agent = MiniSweAgent()
    assert agent.parse("THOUGHT: look around.\n\n```bash\nls -la\n```") == Command("ls -la")
    assert agent.parse("```bash\ncd /x && \\\n  make\n```") == Command("cd /x && \\\n  make")


@pytest.mark.parametrize("reply, found", [
    ("no block at all", 0),
    ("```bash\nls\n```\nthen\n```bash\npwd\n```", 2),
    ("```sh\nls\n```", 0),  # mini-swe-agent accepts only ```bash fences
    ("```bash ls```", 0),  # the command must sit on its own lines
])
def test_miniswe_format_errors_say_how_many_actions_were_found(reply, found):
    action = MiniSweAgent().parse(reply)
    assert isinstance(action, FormatError)
    assert action.feedback == render(FORMAT_ERROR_TEMPLATE, actions=["x"] * found)
    assert f"found {found} actions" in action.feedback and "```bash\n<action>\n```" in action.feedback


def test_miniswe_submit_command_alone_submits_without_running():
    agent = MiniSweAgent()
    assert isinstance(agent.parse("Done.\n```bash\necho COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT\n```"), Submit)
    # Combined with other commands it must run: the submission is the rest of its output.
    combined = "```bash\necho COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT && git diff --cached\n```"
    assert agent.parse(combined) == Command("echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT && git diff --cached")
    # `submit` is the bash scaffold's word, not mini-swe-agent's.
    assert agent.parse("```bash\nsubmit\n```") == Command("submit")


def test_miniswe_finishes_when_the_first_output_line_is_the_sentinel():
    agent = MiniSweAgent()
    done = agent.finished(ExecResult(exit_code=0, stdout="\n  COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT\ndiff --git a b\n"))
    assert done == Submit(note="diff --git a b\n")
    assert agent.finished(ExecResult(exit_code=0, stdout="MINI_SWE_AGENT_FINAL_OUTPUT\n")) == Submit(note="")
    assert agent.finished(ExecResult(exit_code=0, stdout="x\nCOMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT\n")) is None
    assert agent.finished(ExecResult(exit_code=0, stdout="")) is None
    assert submission_of("COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT") == ""
    assert BashAgent().finished(ExecResult(exit_code=0, stdout="COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT\n")) is None


# -- observations: exit codes and truncation -----------------------------------------


def test_miniswe_observation_shows_returncode_and_output():
    [msg] = MiniSweAgent().observe(ExecResult(exit_code=2, stdout="out\n", stderr="err\n"), "ls nope")
    assert msg.role == "user"
    assert msg.content == "<returncode>2</returncode>\n<output>\nout\n\nerr\n</output>"


def test_miniswe_long_output_keeps_head_and_tail_with_elided_count():
    output = "H" * 600 + "M" * 1000 + "T" * 600
    [msg] = MiniSweAgent(max_observation_chars=1000).observe(ExecResult(exit_code=0, stdout=output))
    text = msg.content
    assert text.startswith("<returncode>0</returncode>\n<warning>\nThe output of your last command was too long.")
    assert "<output_head>\n" + "H" * 500 + "\n</output_head>" in text
    assert "<output_tail>\n" + "T" * 500 + "\n</output_tail>" in text
    assert "<elided_chars>\n1200 characters elided\n</elided_chars>" in text
    assert "M" * 10 not in text


def test_miniswe_timeout_names_the_command():
    [msg] = MiniSweAgent().observe(ExecResult(exit_code=124, stdout="partial", timed_out=True), "sleep 999")
    assert msg.content.startswith("The last command <command>sleep 999</command> timed out and has been killed.")
    assert "<output>\npartial\n</output>" in msg.content and "avoid those requiring interactive input" in msg.content


def test_bash_observation_shows_exit_code_status_and_truncates_middle():
    agent = BashAgent(max_observation_chars=200)
    [msg] = agent.observe(ExecResult(exit_code=3, stdout="a" * 150 + "b" * 150))
    assert msg.content.startswith("[exit code 3]\n" + "a" * 100)
    assert msg.content.endswith("b" * 100) and "[... 100 characters omitted ...]" in msg.content
    [msg] = agent.observe(ExecResult(exit_code=124, stdout="", timed_out=True))
    assert msg.content.startswith("[timed out]")


def test_truncate_middle_keeps_head_and_tail():
    assert truncate_middle("short", 10) == "short"
    cut = truncate_middle("0123456789" * 10, 20)
    assert cut.startswith("0123456789\n") and cut.endswith("\n0123456789")
    assert "[... 80 characters omitted ...]" in cut


# -- trajectories ------------------------------------------------------------------


def _step(index, messages_in, completion, action=None, observation=None, model="m1"):
    return SimpleNamespace(index=index, messages_in=messages_in, completion=completion, action=action,
                           observation=observation, model=model)


def _episode(**kw):
    base = {"id": "e1", "run_id": "r1", "state": "succeeded", "exit_status": "submitted", "reward": 1.0,
            "advantage": 0.0, "tokens": 42, "patch": None}
    return SimpleNamespace(**{**base, **kw})


def test_transcript_rebuilds_the_conversation_in_order():
    steps = [_step(0, [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "a0"),
             _step(1, [{"role": "user", "content": "o0"}], "a1"),
             _step(2, [{"role": "user", "content": "o1"}], None)]
    assert [(m["role"], m["content"]) for m in transcript(steps)] == [
        ("system", "s"), ("user", "u"), ("assistant", "a0"), ("user", "o0"), ("assistant", "a1"), ("user", "o1")]


def test_trajectory_submitted_through_output_is_minisweagent_format():
    steps = [
        _step(0, [{"role": "system", "content": "sys"}, {"role": "user", "content": "task"}], "```bash\nls\n```",
              action="ls", observation="a.py\n"),
        _step(1, [{"role": "user", "content": "<returncode>0</returncode>\n<output>\na.py\n</output>"}],
              "```bash\necho COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT && git diff\n```",
              action="echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT && git diff",
              observation="COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT\ndiff --git a/a.py b/a.py\n"),
    ]
    traj = to_minisweagent_trajectory(_episode(), steps, instance_id="repo__1")
    json.dumps(traj)  # what mini-swe-agent's tools read is plain JSON
    assert traj["trajectory_format"] == "mini-swe-agent-1.1"
    assert traj["instance_id"] == "repo__1"
    info = traj["info"]
    assert info["exit_status"] == "Submitted"
    assert info["submission"] == "diff --git a/a.py b/a.py\n"
    assert info["model_stats"]["api_calls"] == 2
    assert info["config"]["model"]["model_name"] == "m1"
    assert info["megaflow"]["exit_status"] == "submitted" and info["megaflow"]["reward"] == 1.0
    roles = [m["role"] for m in traj["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant", "exit"]
    assert traj["messages"][2]["extra"] == {"actions": [{"command": "ls"}]}
    assert traj["messages"][3]["extra"] == {"raw_output": "a.py\n", "returncode": None}
    assert traj["messages"][-1] == {"role": "exit", "content": "diff --git a/a.py b/a.py\n", "extra": {
        "exit_status": "Submitted", "submission": "diff --git a/a.py b/a.py\n"}}


@pytest.mark.parametrize("exit_status, name", [
    ("step_limit", "LimitsExceeded"), ("token_limit", "LimitsExceeded"), ("time_limit", "TimeExceeded"),
    ("format_errors", "RepeatedFormatError"), ("context_length", "ContextWindowExceededError"),
    ("sandbox_lost", "sandbox_lost"),
])
def test_trajectory_names_endings_as_minisweagent_does(exit_status, name):
    steps = [_step(0, [{"role": "user", "content": "task"}], "```bash\nls\n```", action="ls", observation="")]
    traj = to_minisweagent_trajectory(_episode(state="failed", exit_status=exit_status, reward=-0.5), steps)
    assert traj["info"]["exit_status"] == name
    assert traj["info"]["submission"] == ""
    assert traj["messages"][-1] == {"role": "exit", "content": name, "extra": {"exit_status": name,
                                                                               "submission": ""}}
    assert "instance_id" not in traj


def test_trajectory_submitted_by_command_alone_uses_the_patch():
    steps = [_step(0, [{"role": "user", "content": "task"}], "```bash\necho COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT\n```",
                   action="submit")]
    traj = to_minisweagent_trajectory(_episode(patch="diff --git x y\n"), steps)
    assert traj["info"]["submission"] == "diff --git x y\n"
    assert [m["role"] for m in traj["messages"]][-2:] == ["assistant", "exit"]
    assert traj["messages"][-2]["extra"] == {"actions": [{"command": "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"}]}
