"""mini-swe-agent for real: its own configs drive the scaffold, its own code reads our trajectories.

The references come from the installed ``mini-swe-agent`` package itself: its
``DefaultAgent`` renders the first prompt and its observations, its text-action
parser renders format errors, its inspector loads the exported ``*.traj.json``.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest
import yaml
from sqlalchemy import select

from megaflow.agent import Command, FormatError, Submit, miniswe_config
from megaflow.agent.miniswe import MiniSweAgent
from megaflow.agent.miniswe_config import V2_ACTION_REGEX, ConfigError, find_config, load_config
from megaflow.config import Settings
from megaflow.db.models import Episode, Run, Step
from megaflow.inprocess import InProcessRunner
from megaflow.sandbox.base import ExecResult
from megaflow.spec import AgentConfig, RunSpec, SpecError, SWETask

PROBLEM = "range(3) yields 4 numbers.\nIt should stop before 3 ({{ not a template }})."
TASK = SWETask(instance_id="demo__demo-1", problem_statement=PROBLEM)


@pytest.fixture(scope="module")
def mswea(tmp_path_factory):
    """The mini-swe-agent package, imported quietly (its import prints a banner and makes a config dir)."""
    os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")
    os.environ.setdefault("MSWEA_GLOBAL_CONFIG_DIR", str(tmp_path_factory.mktemp("mswea")))
    from minisweagent.agents.default import DefaultAgent
    from minisweagent.environments.local import LocalEnvironment
    from minisweagent.models.test_models import DeterministicModel, make_output

    return DefaultAgent, LocalEnvironment, DeterministicModel, make_output


def run_minisweagent(mswea, config: dict, commands: list[str], cwd) -> list[dict]:
    """mini-swe-agent's own agent loop over `commands` (the last one submits); its messages."""
    DefaultAgent, LocalEnvironment, DeterministicModel, make_output = mswea
    outputs = [make_output(f"THOUGHT: step {i}", [{"command": c}]) for i, c in enumerate(commands)]
    model = DeterministicModel(outputs=outputs, **{k: v for k, v in config["model"].items()
                                                   if k in ("observation_template",)})
    agent = DefaultAgent(model, LocalEnvironment(cwd=str(cwd)), **config["agent"])
    agent.run(TASK.problem_statement)
    return agent.messages


def test_the_packages_swebench_config_gives_the_first_prompt_minisweagent_gives(mswea, tmp_path):
    config = load_config("swebench")
    assert find_config("swebench").parent.name == "benchmarks"  # the package's own file
    theirs = run_minisweagent(mswea, config, ["echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"], tmp_path)
    ours = MiniSweAgent(config=config).start(TASK)
    assert [(m.role, m.content) for m in ours] == [(m["role"], m["content"]) for m in theirs[:2]]
    assert "<pr_description>\nConsider the following PR description:\nrange(3) yields 4" in ours[1].content
    # It acts through the `bash` tool; until tool calls reach scaffolds, a fenced block is read.
    assert MiniSweAgent(config=config).config.tool_calls


def test_a_text_config_renders_observations_format_errors_and_submits_as_minisweagent(mswea, tmp_path):
    # swebench_backticks run as `mini-extra swebench --model-class litellm_textbased` runs it.
    config = load_config("swebench_backticks")
    config["model"]["model_class"] = "litellm_textbased"
    agent = MiniSweAgent(config=config)
    assert agent.config.action_regex == V2_ACTION_REGEX and not agent.config.tool_calls
    (tmp_path / "patch.txt").write_text("diff --git a/x b/x\n")
    commands = ["printf 'out\\n'; echo err >&2; exit 3", "seq 1 3000", "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT && cat patch.txt"]
    theirs = run_minisweagent(mswea, config, commands, tmp_path)
    observations = [m for m in theirs if m["role"] == "user" and "raw_output" in m.get("extra", {})]
    assert len(observations) == 2
    for m in observations:
        result = ExecResult(exit_code=m["extra"]["returncode"], stdout=m["extra"]["raw_output"])
        [ours] = agent.observe(result)
        assert ours.content == m["content"]
    assert "characters elided" in observations[1]["content"]
    exit_message = theirs[-1]
    assert exit_message["extra"]["exit_status"] == "Submitted"
    submitted = agent.finished(ExecResult(exit_code=0, stdout="COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT\ndiff --git a/x b/x\n"))
    assert submitted == Submit(note=exit_message["extra"]["submission"])
    assert agent.finished(ExecResult(exit_code=1, stdout="COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT\n")) is None

    from minisweagent.exceptions import FormatError as TheirFormatError
    from minisweagent.models.utils.actions_text import parse_regex_actions

    for reply in ["no action", "```mswea_bash_command\nls\n```\n```mswea_bash_command\npwd\n```"]:
        with pytest.raises(TheirFormatError) as caught:
            parse_regex_actions(reply, action_regex=V2_ACTION_REGEX,
                                format_error_template=config["model"]["format_error_template"])
        ours = agent.parse(reply)
        assert isinstance(ours, FormatError) and ours.feedback == caught.value.messages[0]["content"]
    reply = "THOUGHT: look.\n\n```mswea_bash_command\nls -la\n```"
    [action] = parse_regex_actions(reply, action_regex=V2_ACTION_REGEX, format_error_template="")
    assert agent.parse(reply) == Command(action["command"])


def test_a_config_names_its_own_action_regex():
    agent = MiniSweAgent(config=load_config("swebench_xml"))
    assert agent.parse("THOUGHT: x\n<mswea_bash_command>ls</mswea_bash_command>") == Command("ls")
    assert isinstance(agent.parse("```bash\nls\n```"), FormatError)


def test_bad_configs_are_one_line_errors_before_anything_runs(tmp_path):
    bad_template = tmp_path / "bad.yaml"
    bad_template.write_text(yaml.safe_dump({"agent": {"system_template": "Hi {{ nobody }}",
                                                      "instance_template": "{{task}}"}}))
    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("agent: [unclosed\n")
    cases = {"no-such-config": "not found", str(bad_template): "system_template does not render: 'nobody' is undefined",
             str(not_yaml): "cannot read mini-swe-agent config"}
    for source, message in cases.items():
        with pytest.raises(ConfigError, match=message) as caught:
            load_config(source)
        assert "\n" not in str(caught.value)
        with pytest.raises(SpecError, match=message):
            RunSpec.parse({"name": "x", "agent": {"type": "miniswe", "config": source},
                           "tasks": [{"instance_id": "t", "instruction": "i", "check": "true"}]})
    with pytest.raises(ConfigError, match="action_regex"):
        load_config({"agent": {"system_template": "s", "instance_template": "i"}, "model": {"action_regex": "("}})
    with pytest.raises(ValueError, match="only for type miniswe"):
        AgentConfig(type="bash", config="swebench")


def test_without_the_package_the_builtin_config_still_works(monkeypatch):
    monkeypatch.setattr(miniswe_config, "package_config_dir", lambda: None)
    with pytest.raises(ConfigError, match="pip install mini-swe-agent"):
        load_config("swebench")
    agent = MiniSweAgent()
    assert agent.parse("```bash\nls\n```") == Command("ls")
    assert agent.start(TASK)[1].content.startswith(f"Please solve this issue: {PROBLEM}\n")


def run_episode(runner, agent: dict, name: str, replies: list[str]) -> tuple:
    """One episode of task `name` in a run of its own, driven in process: (run id, summary)."""
    [summary] = runner.run({"name": name, "agent": agent, "sandbox": {"type": "memory"},
                            "model": {"type": "scripted", "replies": replies},
                            "tasks": [{"instance_id": name, "instruction": f"task {name}", "check": "cat done.txt"}]})
    with runner.rt.session(readonly=True) as s:
        return s.execute(select(Episode.run_id).where(Episode.id == summary.episode_id)).scalar_one(), summary


def test_a_yaml_config_file_drives_episodes_and_is_kept_in_the_run(tmp_path, sqlite_url):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({
        "agent": {"system_template": "Act in {{cwd}} on {{system}}.", "instance_template": "Do: {{task}}",
                  "step_limit": 7},
        "environment": {"cwd": "/testbed"},
        "model": {"model_class": "litellm_textbased", "observation_template": "rc={{output.returncode}} {{output.output}}",
                  "format_error_template": "{{error}}"}}))
    fence = "```mswea_bash_command\n{}\n```"
    runner = InProcessRunner(Settings(data_dir=tmp_path, database_url=sqlite_url))
    run_id, summary = run_episode(runner, {"type": "miniswe", "config": str(path)}, "t", [
        "no action", fence.format("echo hi > done.txt"),
        fence.format("echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT && cat done.txt")])
    assert (summary.state, summary.exit_status) == ("succeeded", "submitted")
    with runner.rt.session(readonly=True) as s:
        stored = s.get(Run, run_id).spec["agent"]["config"]
        steps = s.execute(select(Step).where(Step.episode_id == summary.episode_id).order_by(Step.index)).scalars().all()
        assert stored["agent"]["instance_template"] == "Do: {{task}}"  # workers need not see the file
        assert [m["content"] for m in steps[0].messages_in] == ["Act in /testbed on Linux.", "Do: task t"]
        assert steps[1].messages_in[0]["content"] == "Expected exactly 1 action, found 0."
        assert steps[2].messages_in[0]["content"] == "rc=0 "


def test_exported_trajectories_load_in_minisweagents_inspector(mswea, tmp_path, sqlite_url):
    fence = "```bash\n{}\n```"
    runner = InProcessRunner(Settings(data_dir=tmp_path, database_url=sqlite_url))
    submits = run_episode(runner, {"type": "miniswe"}, "a", [
        fence.format("echo hi > done.txt"), fence.format("echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT && cat done.txt")])
    errs = run_episode(runner, {"type": "miniswe"}, "b", ["no action"])
    assert [summary.exit_status for _, summary in (submits, errs)] == ["submitted", "format_errors"]
    out = tmp_path / "trajs"
    for run_id, _ in (submits, errs):
        assert runner.client.export(run_id, "minisweagent", out) == 1
    files = sorted(out.glob("*/*.traj.json"))
    assert [f.name for f in files] == ["a.traj.json", "b.traj.json"]

    from minisweagent.agents.default import AgentConfig as TheirAgentConfig
    from minisweagent.run.utilities.inspector import TrajectoryInspector

    for f in files:
        TheirAgentConfig(**json.loads(f.read_text())["info"]["config"]["agent"])  # a config mini-swe-agent accepts

    async def browse() -> list[tuple[int, str]]:
        app = TrajectoryInspector(files)
        seen = []
        async with app.run_test() as pilot:
            for _ in files:
                await pilot.press("$")
                seen.append((app.n_steps, app.title))
                await pilot.press("L")
        return seen

    (a_steps, a_title), (b_steps, b_title) = asyncio.run(browse())
    # A page per model call, plus the opening one (system prompt and task).
    assert (a_steps, b_steps) == (3, 5)
    assert a_title.endswith("a.traj.json - Step 3/3") and b_title.endswith("b.traj.json - Step 5/5")
    a = json.loads(files[0].read_text())
    assert a["info"]["exit_status"] == "Submitted" and a["info"]["submission"] == "hi\n"
    assert a["messages"][-1] == {"role": "exit", "content": "hi\n",
                                 "extra": {"exit_status": "Submitted", "submission": "hi\n"}}
    assert json.loads(files[1].read_text())["info"]["exit_status"] == "RepeatedFormatError"
