"""The built-in bash agent: ReAct style, one fenced bash block per turn, `submit` to finish."""

from __future__ import annotations

import re

from megaflow.agent.base import Action, Command, FormatError, Submit, truncate_middle
from megaflow.model.base import Message
from megaflow.sandbox.base import ExecResult

SYSTEM_PROMPT = """You are an autonomous agent working in a Linux shell, in the directory /work.
Each reply must contain exactly one command in a fenced block:

```bash
your command here
```

You will see the command's exit code and output. When the task is done, reply with:

```bash
submit
```
"""

_BLOCK = re.compile(r"```(?:bash|sh|shell)?[ \t]*\n(.*?)```", re.DOTALL)
SUBMIT_WORDS = frozenset({"submit", "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"})


def task_statement(task) -> str:
    return task.problem_statement if task.kind == "swe" else task.instruction


class BashAgent:
    def __init__(self, system_prompt: str | None = None, max_observation_chars: int = 10_000):
        self.system_prompt = system_prompt or SYSTEM_PROMPT
        self.max_observation_chars = max_observation_chars

    def start(self, task) -> list[Message]:
        return [
            Message(role="system", content=self.system_prompt),
            Message(role="user", content=f"Task:\n{task_statement(task)}"),
        ]

    def parse(self, completion: str) -> Action:
        blocks = [b.strip() for b in _BLOCK.findall(completion)]
        if len(blocks) != 1:
            return FormatError(
                f"Your reply must contain exactly one ```bash block; found {len(blocks)}. "
                "Reply with one command, or `submit` when done."
            )
        cmd = blocks[0]
        if not cmd:
            return FormatError("The bash block was empty.")
        if cmd.splitlines()[0].strip() in SUBMIT_WORDS:
            return Submit()
        return Command(cmd)

    def observe(self, result: ExecResult, command: str = "") -> list[Message]:
        out = result.output
        status = "timed out" if result.timed_out else f"exit code {result.exit_code}"
        body = truncate_middle(out, self.max_observation_chars)
        return [Message(role="user", content=f"[{status}]\n{body}")]

    def finished(self, result: ExecResult) -> Submit | None:
        # This scaffold submits only by its `submit` command, never through output.
        return None

    def scripted_action(self, task, step: int) -> Action | None:
        return None
