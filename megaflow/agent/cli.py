"""The ``cli`` scaffold: any agent program, run inside the sandbox for the whole episode.

The program has its own loop; MegaFlow only serves it a model endpoint (the model
proxy, `megaflow.hops.cli_proxy`) and grades what it leaves. So this scaffold
chooses one action: step 0 starts the program (`launch_command`, sent to the
sandbox's ``spawn`` by the exec hop: it returns at once). The episode then parks;
every model call the program makes is a step recorded by the proxy, and the
program's exit (a last step) ends the episode in evaluation, as a submit would.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from megaflow.agent.base import Action, Command, FormatError, Submit
from megaflow.model.base import Message
from megaflow.sandbox.base import ExecResult

#: The sandbox-side runner's source (stdlib only: it runs with the sandbox's python3).
RUNNER = Path(__file__).with_name("cli_runner.py")
RUNNER_PATH = "/tmp/.megaflow/runner.py"


def socket_dir(data_dir) -> Path:
    """The host directory of the model proxy's socket, bound at /run/megaflow in CLI agents' sandboxes."""
    return Path(data_dir) / "cli-proxy"


def task_text(task) -> str:
    return task.instruction if task.kind == "terminal" else task.problem_statement


def launch_command(command: str, port: int, task_text: str) -> str:
    """The shell command (step 0's action) that runs `command` under the runner.

    Everything travels base64-encoded, so no quoting of the user's command or the
    task can break it. The proxy's token is not in it (actions are exported): the
    exec hop gives it as ``$MEGAFLOW_TOKEN`` when it spawns this.
    """
    runner = base64.b64encode(RUNNER.read_bytes()).decode()
    config = base64.b64encode(json.dumps({"command": command, "port": port, "task": task_text}).encode()).decode()
    return (f"mkdir -p /tmp/.megaflow && printf %s {runner} | base64 -d > {RUNNER_PATH} && "
            f"exec python3 {RUNNER_PATH} {config}")


class CliAgent:
    """The `Agent` of a CLI program; `detached` tells the `Driver` that the program drives the model."""

    #: The episode waits (parked) while the program runs; see `megaflow.hops.driver.Driver.after_program`.
    detached = True

    def __init__(self, command: str, port: int = 4000, **_ignored):
        self.command, self.port = command, port

    def start(self, task) -> list[Message]:
        # Nothing for the model yet: the program writes its own prompts (recorded per call by the proxy).
        return []

    def scripted_action(self, task, step: int) -> Action | None:
        return Command(launch_command(self.command, self.port, task_text(task))) if step == 0 else None

    def parse(self, completion: str) -> Action:
        return FormatError("a CLI agent's replies are read by its own program, not by MegaFlow")

    def observe(self, result: ExecResult, command: str = "") -> list[Message]:
        return []

    def finished(self, result: ExecResult) -> Submit | None:
        return Submit("the agent program exited")
