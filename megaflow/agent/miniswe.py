"""A mini-swe-agent scaffold: its own configs and prompts, its action format, its trajectories.

Reads mini-swe-agent's YAML configs (``agent: {type: miniswe, config: swebench}``; see
`megaflow.agent.miniswe_config`) and renders their Jinja2 templates as
mini-swe-agent does. Without a config it uses a built-in one in the 1.x shape
(``config/default.yaml`` of mini-swe-agent 1.x), which needs no package: the
reply must hold exactly one ```` ```bash ```` block; observations show the
return code and the output (head and tail kept when it is long); the agent
finishes when the first line of a command's output is
``COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT``, and the rest of that output is its
submission. ``to_minisweagent_trajectory`` writes episodes in the trajectory
format mini-swe-agent 2.x saves (``*.traj.json``), which its inspector loads.
"""

from __future__ import annotations

import functools
import re
from importlib import metadata

from megaflow.agent.base import Action, Command, FormatError, Submit, transcript
from megaflow.agent.bash import task_statement
from megaflow.agent.miniswe_config import V1_ACTION_REGEX, MiniSweConfig, render
from megaflow.db.states import ExitStatus
from megaflow.model.base import Message
from megaflow.sandbox.base import ExecResult

SUBMIT_SENTINEL = "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"
#: mini-swe-agent 1.x's legacy sentinel, still accepted by its `has_finished`.
LEGACY_SENTINEL = "MINI_SWE_AGENT_FINAL_OUTPUT"
SUBMIT_COMMAND = f"echo {SUBMIT_SENTINEL}"
#: What mini-swe-agent 2.x's ``DefaultAgent.serialize`` writes.
TRAJECTORY_FORMAT = "mini-swe-agent-1.1"

#: mini-swe-agent 1.x's action regex: a ```bash fence, a newline, the command, a newline, a fence.
ACTION_RE = re.compile(V1_ACTION_REGEX, re.DOTALL)

SYSTEM_TEMPLATE = """\
You are a helpful assistant that can interact with a computer.

Your response must contain exactly ONE bash code block with ONE command (or commands connected with && or ||).
Include a THOUGHT section before your command where you explain your reasoning process.
Format your response as shown in <format_example>.

<format_example>
Your reasoning and analysis here. Explain why you want to perform the action.

```bash
your_command_here
```
</format_example>

Failure to follow these rules will cause your response to be rejected.
"""
INSTANCE_TEMPLATE = """\
Please solve this issue: {{task}}

You can execute bash commands and edit files to implement the necessary changes.

## Recommended Workflow

This workflows should be done step-by-step so that you can iterate on your changes and any possible problems.

1. Analyze the codebase by finding and reading relevant files
2. Create a script to reproduce the issue
3. Edit the source code to resolve the issue
4. Verify your fix works by running your script again
5. Test edge cases to ensure your fix is robust
6. Submit your changes and finish your work by issuing the following command: `echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT`.
   Do not combine it with any other command. <important>After this command, you cannot continue working on this task.</important>

## Important Rules

1. Every response must contain exactly one action
2. The action must be enclosed in triple backticks
3. Directory or environment variable changes are not persistent. Every action is executed in a new subshell.
   However, you can prefix any action with `MY_ENV_VAR=MY_VALUE cd /path/to/working/dir && ...` or write/load environment variables from files

## Formatting your response

Here is an example of a correct response:

<example_response>
THOUGHT: I need to understand the structure of the repository first. Let me check what files are in the current directory to get a better understanding of the codebase.

```bash
ls -la
```
</example_response>

## Useful command examples

### Create a new file:

```bash
cat <<'EOF' > newfile.py
import numpy as np
hello = "world"
print(hello)
EOF
```

### Edit files with sed:

```bash
# Replace all occurrences
sed -i 's/old_string/new_string/g' filename.py

# Replace only first occurrence
sed -i 's/old_string/new_string/' filename.py

# Replace first occurrence on line 1
sed -i '1s/old_string/new_string/' filename.py

# Replace all occurrences in lines 1-10
sed -i '1,10s/old_string/new_string/g' filename.py
```

### View file content:

```bash
# View specific lines with numbers
nl -ba filename.py | sed -n '10,20p'
```

### Any other command you want to run

```bash
anything
```
"""

FORMAT_ERROR_TEMPLATE = """\
Please always provide EXACTLY ONE action in triple backticks, found {{actions|length}} actions.
If you want to end the task, please issue the following command: `echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT`
without any other command.
Else, please format your response exactly as follows:

<response_example>
Here are some thoughts about why you want to perform the action.

```bash
<action>
```
</response_example>

Note: In rare cases, if you need to reference a similar format in your command, you might have
to proceed in two steps, first writing TRIPLEBACKTICKSBASH, then replacing them with ```bash."""

#: As mini-swe-agent's, with its fixed 10000 / 5000 made `max_observation_chars` and half of it.
OBSERVATION_TEMPLATE = """\
<returncode>{{output.returncode}}</returncode>
{% if output.output | length < max_observation_chars -%}
<output>
{{ output.output -}}
</output>
{%- else -%}
<warning>
The output of your last command was too long.
Please try a different command that produces less output.
If you're looking at a file you can try use head, tail or sed to view a smaller number of lines selectively.
If you're using grep or find and it produced too much output, you can use a more selective search pattern.
If you really need to see something from the full command's output, you can redirect output to a file and then search in that file.
</warning>
{% set half = max_observation_chars // 2 -%}
<output_head>
{{ output.output[:half] }}
</output_head>
<elided_chars>
{{ output.output | length - 2 * half }} characters elided
</elided_chars>
<output_tail>
{{ output.output[-half:] }}
</output_tail>
{%- endif -%}"""

TIMEOUT_TEMPLATE = """\
The last command <command>{{action['action']}}</command> timed out and has been killed.
The output of the command was:
<output>
{{output}}
</output>
Please try another command and make sure to avoid those requiring interactive input."""

#: The built-in config, in mini-swe-agent 1.x's shape (every template under ``agent:``).
BUILTIN_CONFIG = {"agent": {
    "system_template": SYSTEM_TEMPLATE, "instance_template": INSTANCE_TEMPLATE,
    "action_observation_template": OBSERVATION_TEMPLATE, "format_error_template": FORMAT_ERROR_TEMPLATE,
    "timeout_template": TIMEOUT_TEMPLATE, "action_regex": V1_ACTION_REGEX}}

#: mini-swe-agent 2.x names its endings after the exception that ended the run.
EXIT_STATUS_NAMES = {
    ExitStatus.SUBMITTED: "Submitted",
    ExitStatus.STEP_LIMIT: "LimitsExceeded",
    ExitStatus.TOKEN_LIMIT: "LimitsExceeded",
    ExitStatus.TIME_LIMIT: "TimeExceeded",
    ExitStatus.FORMAT_ERRORS: "RepeatedFormatError",
    ExitStatus.CONTEXT_LENGTH: "ContextWindowExceededError",
}


@functools.lru_cache(maxsize=1)
def _builtin() -> MiniSweConfig:
    return MiniSweConfig.from_dict(BUILTIN_CONFIG)


def submission_of(output: str) -> str | None:
    """The submission carried by a command's output, or None if it does not submit.

    As mini-swe-agent's environments: the first line of the output (leading
    whitespace ignored) must be the sentinel; the lines after it are the submission.
    """
    lines = output.lstrip().splitlines(keepends=True)
    if lines and lines[0].strip() in (SUBMIT_SENTINEL, LEGACY_SENTINEL):
        return "".join(lines[1:])
    return None


class MiniSweAgent:
    """The mini-swe-agent scaffold.

    Args:
        system_prompt: Replaces the config's system template.
        max_observation_chars: The built-in config's observation keeps only the
            head and tail of longer outputs (mini-swe-agent: 10000); a config's
            own observation template decides for itself (the value is the
            template variable ``max_observation_chars``).
        config: A mini-swe-agent config mapping (`megaflow.agent.miniswe_config`);
            None: the built-in one.
    """

    def __init__(self, system_prompt: str | None = None, max_observation_chars: int = 10_000,
                 config: dict | None = None):
        self.config = _builtin() if config is None else MiniSweConfig.from_dict(config)
        self.system_template = system_prompt or self.config.system_template
        self.instance_template = self.config.instance_template
        self.max_observation_chars = max_observation_chars
        self._action_re = re.compile(self.config.action_regex, re.DOTALL)

    def _render(self, template: str, **values) -> str:
        return render(template, **{**self.config.variables, "max_observation_chars": self.max_observation_chars,
                                   **values})

    def start(self, task) -> list[Message]:
        statement = task_statement(task)
        return [
            Message(role="system", content=self._render(self.system_template, task=statement)),
            Message(role="user", content=self._render(self.instance_template, task=statement)),
        ]

    def parse(self, completion: str) -> Action:
        actions = [a.strip() for a in self._action_re.findall(completion)]
        if len(actions) != 1:
            return FormatError(self._render(self.config.format_error_template, actions=actions,
                                            error=f"Expected exactly 1 action, found {len(actions)}."))
        if actions[0] == SUBMIT_COMMAND:
            # Its only output would be the sentinel: submitting here saves a sandbox round trip.
            return Submit()
        return Command(actions[0])

    def observe(self, result: ExecResult, command: str = "") -> list[Message]:
        output = {"output": result.output, "returncode": result.exit_code, "exception_info": ""}
        if result.timed_out and self.config.timeout_template is not None:
            content = self._render(self.config.timeout_template, action={"action": command}, output=result.output)
        else:
            if result.timed_out:
                # mini-swe-agent 2.x: the environment's exception, in the observation.
                output.update(returncode=-1, exception_info=f"An error occurred while executing the command: "
                                                            f"Command '{command}' timed out")
            content = self._render(self.config.observation_template, output=output)
        return [Message(role="user", content=content)]

    def finished(self, result: ExecResult) -> Submit | None:
        if self.config.submit_needs_success and result.exit_code != 0:
            return None
        submission = submission_of(result.stdout)
        return None if submission is None else Submit(note=submission)

    def scripted_action(self, task, step: int) -> Action | None:
        return None


def to_minisweagent_trajectory(episode, steps, instance_id: str | None = None,
                               model_name: str | None = None, agent: dict | None = None) -> dict:
    """An episode in mini-swe-agent 2.x's trajectory format (``*.traj.json``).

    As ``DefaultAgent.serialize`` writes it, so its inspector and SWE-bench tooling
    read it: ``messages`` is the whole conversation (an assistant message's
    ``extra.actions`` holds its command; an observation's ``extra`` its raw output
    and return code), ending with an ``exit`` message; ``info`` holds the exit
    status (named as mini-swe-agent names them), the submission, model stats and
    the agent config.

    Args:
        episode: An `Episode` row (or an object with the same attributes).
        steps: Its `Step` rows, in index order.
        instance_id: The task instance's id, recorded at the top level as
            mini-swe-agent's SWE-bench runner does.
        model_name: Recorded in ``info.config.model.model_name``.
        agent: The run spec's ``agent`` mapping: its mini-swe-agent config's agent
            section goes to ``info.config.agent``.
    """
    steps = list(steps)
    status = EXIT_STATUS_NAMES.get(episode.exit_status, episode.exit_status)
    submission = ""
    if episode.exit_status == ExitStatus.SUBMITTED:
        last = steps[-1] if steps else None
        through_output = submission_of(last.observation or "") if last is not None and last.action != "submit" else None
        submission = through_output if through_output is not None else (episode.patch or "")
    messages = _messages(steps)
    messages.append({"role": "exit", "content": submission if status == "Submitted" else status,
                     "extra": {"exit_status": status, "submission": submission}})
    spec = agent or {}
    section = ((spec.get("config") or BUILTIN_CONFIG).get("agent") or {})
    if spec.get("system_prompt"):
        section = {**section, "system_template": spec["system_prompt"]}
    data = {
        "info": {
            "exit_status": status,
            "submission": submission,
            "model_stats": {"instance_cost": 0.0, "api_calls": sum(1 for s in steps if s.completion is not None)},
            "mini_version": _package_version(),
            "config": {"agent": section, "agent_type": "megaflow.agent.miniswe.MiniSweAgent",
                       "model": {"model_name": model_name or next((s.model for s in steps if s.model), None)}},
            "megaflow": {"episode_id": episode.id, "run_id": episode.run_id, "state": episode.state,
                         "exit_status": episode.exit_status, "reward": episode.reward,
                         "advantage": episode.advantage, "tokens": episode.tokens},
        },
        "messages": messages,
        "trajectory_format": TRAJECTORY_FORMAT,
    }
    if instance_id is not None:
        data["instance_id"] = instance_id
    return data


def _messages(steps) -> list[dict]:
    # The transcript, plus the `extra` mini-swe-agent keeps: a reply's actions, an output's raw text.
    messages: list[dict] = []
    previous = None
    for step in steps:
        part = transcript([step])
        if step.messages_in and previous is not None and previous.action not in (None, "submit"):
            part[0]["extra"] = {"raw_output": previous.observation or "",
                                "returncode": getattr(previous, "exit_code", None)}
        if step.completion is not None:
            command = SUBMIT_COMMAND if step.action == "submit" else step.action
            part[-1]["extra"] = {"actions": [{"command": command}] if command else []}
        messages.extend(part)
        previous = step
    return messages


def _package_version() -> str | None:
    try:
        return metadata.version("mini-swe-agent")
    except metadata.PackageNotFoundError:
        return None
