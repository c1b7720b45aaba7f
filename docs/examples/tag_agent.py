"""A worked example of an agent scaffold: commands in ``<cmd>`` tags, ``<submit/>`` to finish.

`TagAgent` implements `megaflow.agent.base.Agent`. A scaffold is pure: every method
is a function of its arguments (no state kept between calls), because any agent
worker may take any step of any episode, and a redelivered decision must decide
the same. `tests/test_docs_examples.py` drives it through a scripted episode in the
in-memory sandbox.
"""

from __future__ import annotations

import re

from megaflow.agent.base import Action, Command, FormatError, Submit, truncate_middle
from megaflow.model.base import Message
from megaflow.sandbox.base import ExecResult

SYSTEM_PROMPT = """You work in a Linux shell. Put exactly one shell command in each reply, as
<cmd>your command</cmd>
and reply <submit/> when the task is done."""

_CMD = re.compile(r"<cmd>(.*?)</cmd>", re.DOTALL)


class TagAgent:
    """The scaffold. `system_prompt` and `max_observation_chars` mirror `AgentConfig`'s fields."""

    def __init__(self, system_prompt: str | None = None, max_observation_chars: int = 10_000):
        self.system_prompt = system_prompt or SYSTEM_PROMPT
        self.max_observation_chars = max_observation_chars

    def start(self, task) -> list[Message]:
        """System prompt, then the task's statement (terminal: instruction; SWE: problem statement)."""
        statement = task.instruction if task.kind == "terminal" else task.problem_statement
        return [Message(role="system", content=self.system_prompt), Message(role="user", content=statement)]

    def parse(self, completion: str) -> Action:
        """One ``<cmd>`` is a command, ``<submit/>`` ends the episode, anything else is a format error."""
        if "<submit/>" in completion:
            return Submit()
        commands = [c.strip() for c in _CMD.findall(completion)]
        if len(commands) != 1 or not commands[0]:
            # The feedback goes back to the model; `limits.max_format_errors` in a row end the episode.
            return FormatError(f"Reply with exactly one <cmd>...</cmd> or <submit/>; found {len(commands)} commands.")
        return Command(commands[0])

    def observe(self, result: ExecResult, command: str = "") -> list[Message]:
        """The exit code and the output (head and tail kept) as the next user message."""
        status = "timed out" if result.timed_out else f"exit {result.exit_code}"
        return [Message(role="user", content=f"<{status}>\n{truncate_middle(result.output, self.max_observation_chars)}")]

    def finished(self, result: ExecResult) -> Submit | None:
        """This scaffold submits only through ``<submit/>``, never through a command's output."""
        return None

    def scripted_action(self, task, step: int) -> Action | None:
        """Always ask the model (an oracle scaffold would return the task's solution here)."""
        return None
