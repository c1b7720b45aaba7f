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
import os
from pathlib import Path

from megaflow.agent.base import Action, Command, FormatError, Submit
from megaflow.model.base import Message
from megaflow.sandbox.base import ExecResult

#: The sandbox-side runner's source (stdlib only: it runs with the sandbox's python3).
RUNNER = Path(__file__).with_name("cli_runner.py")
RUNNER_PATH = "/tmp/.megaflow/runner.py"


#: mini-swe-agent (the `mini-swe-agent` package) as a CLI agent: its text-based config, yolo mode,
#: ending at its submit, talking to the proxy through litellm's OpenAI provider. Its own
#: trajectory is left at /tmp/.megaflow/mini.traj.json in the sandbox. Append ``-c
#: agent.step_limit=N`` and the like to change its config.
MINI_SWE_AGENT = (
    "MSWEA_CONFIGURED=true MSWEA_SILENT_STARTUP=1 MSWEA_COST_TRACKING=ignore_errors "
    "MSWEA_GLOBAL_CONFIG_DIR=/tmp/.megaflow/mini LITELLM_LOCAL_MODEL_COST_MAP=True "
    # Retries belong to the model hop (it retries infra failures); the proxy's errors are final.
    "MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT=1 "
    "mini -c mini_textbased.yaml -c model.model_kwargs.api_base=$OPENAI_BASE_URL "
    "-c model.model_kwargs.api_key=$OPENAI_API_KEY --model-class litellm_textbased -m openai/megaflow "
    '-y --exit-immediately -l 0 -t "$MEGAFLOW_TASK" -o /tmp/.megaflow/mini.traj.json'
)


#: The model proxy's socket, in `socket_dir`.
SOCKET_NAME = "model.sock"
#: The longest path a Unix socket can have (Linux's ``sun_path``: 108 bytes with its NUL).
MAX_SOCKET_PATH = 107


def socket_dir(data_dir) -> Path:
    """The host directory of the model proxy's socket, bound at /run/megaflow in CLI agents' sandboxes."""
    return Path(data_dir) / "cli-proxy"


def socket_path(data_dir) -> Path:
    """The model proxy's socket; checked to fit in a Unix socket's address.

    Raises:
        OSError: the path is too long for a Unix socket (one line naming the fix).
    """
    path = socket_dir(Path(data_dir).absolute()) / SOCKET_NAME
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise OSError(f"the CLI agents' model socket {path} is {len(os.fsencode(path))} bytes, over the "
                      f"{MAX_SOCKET_PATH} a Unix socket allows: set MEGAFLOW_DATA_DIR to a shorter directory")
    return path


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
