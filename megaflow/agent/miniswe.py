"""A mini-swe-agent compatible scaffold: its prompts, its action format, its trajectories.

Follows mini-swe-agent 1.x (``config/default.yaml``, ``agents/default.py``): the
reply must hold exactly one ```` ```bash ```` block; observations show the return
code and the output (head and tail kept when it is long); the agent finishes when
the first line of a command's output is ``COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT``,
and the rest of that output is its submission. The templates use its ``{{name}}``
placeholders, rendered here without jinja2 (only plain names are substituted), and
``to_minisweagent_trajectory`` can hand episodes to mini-swe-agent's own tools.
"""

from __future__ import annotations

import re

from megaflow.agent.base import Action, Command, FormatError, Submit, transcript
from megaflow.agent.bash import task_statement
from megaflow.db.states import ExitStatus
from megaflow.model.base import Message
from megaflow.sandbox.base import ExecResult

SUBMIT_SENTINEL = "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"
#: mini-swe-agent's legacy sentinel, still accepted by its `has_finished`.
LEGACY_SENTINEL = "MINI_SWE_AGENT_FINAL_OUTPUT"
SUBMIT_COMMAND = f"echo {SUBMIT_SENTINEL}"
TRAJECTORY_FORMAT = "mini-swe-agent-1"

#: mini-swe-agent's action regex: a ```bash fence, a newline, the command, a newline, a fence.
ACTION_RE = re.compile(r"```bash\s*\n(.*?)\n```", re.DOTALL)
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")

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
Please always provide EXACTLY ONE action in triple backticks, found {{n_actions}} actions.
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

LONG_OUTPUT_WARNING = """\
<warning>
The output of your last command was too long.
Please try a different command that produces less output.
If you're looking at a file you can try use head, tail or sed to view a smaller number of lines selectively.
If you're using grep or find and it produced too much output, you can use a more selective search pattern.
If you really need to see something from the full command's output, you can redirect output to a file and then search in that file.
</warning>"""

TIMEOUT_TEMPLATE = """\
The last command <command>{{command}}</command> timed out and has been killed.
The output of the command was:
{{output}}
Please try another command and make sure to avoid those requiring interactive input."""

#: mini-swe-agent names its endings after the exception that ended the run.
EXIT_STATUS_NAMES = {
    ExitStatus.SUBMITTED: "Submitted",
    ExitStatus.STEP_LIMIT: "LimitsExceeded",
    ExitStatus.TOKEN_LIMIT: "LimitsExceeded",
    ExitStatus.TIME_LIMIT: "LimitsExceeded",
    ExitStatus.FORMAT_ERRORS: "FormatError",
    ExitStatus.CONTEXT_LENGTH: "ContextWindowExceededError",
}


def render(template: str, **values) -> str:
    """Substitute ``{{name}}`` placeholders that have a value.

    Others are left as written: a user's template naming a variable this
    scaffold lacks shows it to the model instead of failing every episode.
    """
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), template)


def submission_of(output: str) -> str | None:
    """The submission carried by a command's output, or None if it does not submit.

    As mini-swe-agent's ``has_finished``: the first line of the output (leading
    whitespace ignored) must be the sentinel; the lines after it are the submission.
    """
    lines = output.lstrip().splitlines(keepends=True)
    if lines and lines[0].strip() in (SUBMIT_SENTINEL, LEGACY_SENTINEL):
        return "".join(lines[1:])
    return None


class MiniSweAgent:
    """The mini-swe-agent scaffold.

    Args:
        system_prompt: Replaces the system template (``{{task}}`` may be used).
        max_observation_chars: Outputs longer than this show only their head and
            tail, half each (mini-swe-agent: 10000).
    """

    def __init__(self, system_prompt: str | None = None, max_observation_chars: int = 10_000):
        self.system_template = system_prompt or SYSTEM_TEMPLATE
        self.instance_template = INSTANCE_TEMPLATE
        self.max_observation_chars = max_observation_chars

    def start(self, task) -> list[Message]:
        statement = task_statement(task)
        return [
            Message(role="system", content=render(self.system_template, task=statement)),
            Message(role="user", content=render(self.instance_template, task=statement)),
        ]

    def parse(self, completion: str) -> Action:
        actions = ACTION_RE.findall(completion)
        if len(actions) != 1:
            return FormatError(render(FORMAT_ERROR_TEMPLATE, n_actions=len(actions)))
        cmd = actions[0].strip()
        if cmd == SUBMIT_COMMAND:
            # Its only output would be the sentinel: submitting here saves a sandbox round trip.
            return Submit()
        return Command(cmd)

    def observe(self, result: ExecResult, command: str = "") -> list[Message]:
        output = result.output
        if result.timed_out:
            content = render(TIMEOUT_TEMPLATE, command=command, output=self._output_block(output))
        else:
            content = f"<returncode>{result.exit_code}</returncode>\n{self._output_block(output)}"
        return [Message(role="user", content=content)]

    def _output_block(self, output: str) -> str:
        limit = self.max_observation_chars
        if len(output) < limit:
            return f"<output>\n{output}</output>"
        half = limit // 2
        return (f"{LONG_OUTPUT_WARNING}\n<output_head>\n{output[:half]}\n</output_head>\n"
                f"<elided_chars>\n{len(output) - 2 * half} characters elided\n</elided_chars>\n"
                f"<output_tail>\n{output[-half:]}\n</output_tail>")

    def finished(self, result: ExecResult) -> Submit | None:
        submission = submission_of(result.stdout)
        return None if submission is None else Submit(note=submission)

    def scripted_action(self, task, step: int) -> Action | None:
        return None


def to_minisweagent_trajectory(episode, steps, instance_id: str | None = None,
                               model_name: str | None = None) -> dict:
    """An episode in mini-swe-agent's trajectory format (``*.traj.json``).

    Readable by mini-swe-agent's inspector and its SWE-bench tooling: ``info``
    holds the exit status (named as mini-swe-agent names them), the submission
    and model stats; ``messages`` is the whole conversation.

    Args:
        episode: An `Episode` row (or an object with the same attributes).
        steps: Its `Step` rows, in index order.
        instance_id: The task instance's id, recorded at the top level as
            mini-swe-agent's SWE-bench runner does.
        model_name: Recorded in ``info.config.model.model_name``.
    """
    steps = list(steps)
    messages = transcript(steps)
    submission = None
    if episode.exit_status == ExitStatus.SUBMITTED:
        last = steps[-1] if steps else None
        if last is not None and last.action != "submit":
            submission = submission_of(last.observation or "")
        if submission is not None:
            # mini-swe-agent appends the Submitted exception's text as a user message.
            messages.append({"role": "user", "content": submission})
        else:
            submission = episode.patch or ""
    calls = sum(1 for s in steps if s.completion is not None)
    data = {
        "info": {
            "exit_status": EXIT_STATUS_NAMES.get(episode.exit_status, episode.exit_status),
            "submission": submission,
            "model_stats": {"instance_cost": 0.0, "api_calls": calls},
            "mini_version": None,
            "config": {"model": {"model_name": model_name or next((s.model for s in steps if s.model), None)},
                       "agent_type": "megaflow.agent.miniswe.MiniSweAgent"},
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
