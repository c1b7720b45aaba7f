"""Step 0 of a CLI agent's episode on its env host: start the program, return at once.

Called by the exec hop (`megaflow.hops.env_hop.exec_task`) for that one step: the
sandbox spawns the runner (`megaflow.agent.cli.launch_command`) in the background
with the episode's proxy token, and this host's model proxy (`cli_proxy.ensure`)
watches the episode's deadline. The hop is recorded like any exec (claimed first:
a redelivery never starts the program twice), and its decision parks the episode.
"""

from __future__ import annotations

import logging

from megaflow.contract import HopResult, failure
from megaflow.db.states import ExitStatus
from megaflow.deadlines import remaining_s
from megaflow.errors import SandboxError
from megaflow.hops import cli_proxy

log = logging.getLogger(__name__)


def launch(app, rt, ep, step: int, action: str, write_step) -> tuple[dict, object]:
    """Spawn the program in the episode's sandbox; (result, write) as a hop's work returns them.

    `write_step(s, observation, exit_code)` records the step's outcome (the exec hop's own writer).
    """
    config = rt.sandbox_config(ep)
    try:
        # A fresh handle with the episode's full config: the socket directory is bound by it.
        sb = rt.backend(config.type).attach(ep.sandbox_id, config)
        spawn = getattr(sb, "spawn", None)
        if spawn is None:
            return failure("exec", step, f"the {config.type} sandbox cannot run an agent program (use local or "
                           "docker)", ExitStatus.SETUP_FAILED).wire(), None
        proxy = cli_proxy.ensure(app, rt)
        spawn(f"export MEGAFLOW_TOKEN={proxy.token(ep.id)}; {action}",
              timeout=remaining_s(ep.deadline_at, rt.spec(ep.run_id).limits.episode_timeout_s))
    except (SandboxError, OSError) as exc:
        return failure("exec", step, exc, ExitStatus.SANDBOX_LOST).wire(), None
    proxy.watch(ep.id, ep.deadline_at)
    log.info("episode %s: agent program started in sandbox %s", ep.id, ep.sandbox_id)

    def write(s):
        write_step(s, "agent program started", 0)

    return HopResult(hop="exec", step=step, exit_code=0, host=rt.settings.host).wire(), write
