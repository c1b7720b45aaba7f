"""The oracle scaffold: replays a task's known solution, then submits.

It validates environments the way SWE-bench validates gold patches: if the
oracle does not earn reward 1, the task (not the agent) is broken.
"""

from __future__ import annotations

import shlex

from megaflow.agent.base import Action, Command, Submit
from megaflow.agent.bash import BashAgent


def solution_commands(task) -> list[str]:
    if task.kind == "terminal":
        return list(task.solution)
    if task.kind == "computer":  # GUI actions, as the desktop's helper runs them
        from megaflow.sandbox.desktop_actions import command

        return [command(a["action"], {k: v for k, v in a.items() if k != "action"}) for a in task.solution]
    if task.patch:
        quoted = shlex.quote(task.patch)
        return [f"printf '%s' {quoted} | git apply -v - || printf '%s' {quoted} | patch -p1"]
    return []


class OracleAgent(BashAgent):
    def scripted_action(self, task, step: int) -> Action | None:
        commands = solution_commands(task)
        if step < len(commands):
            return Command(commands[step])
        return Submit("oracle")
