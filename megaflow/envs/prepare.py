"""Prepare a sandbox for a task: its files and setup commands (SWE tasks: the repository too).

The env hops (provision, rebuild) and task-set validation (`validate`) all prepare a
sandbox this one way, so a task that validates is set up in an episode the same.
"""

from __future__ import annotations

from megaflow.deadlines import Budget
from megaflow.envs import grading, swe
from megaflow.sandbox.base import Sandbox, SandboxConfig


def setup(sb: Sandbox, task, timeout: float, config: SandboxConfig | None = None, cache_root=None,
          defer_baseline: bool = False) -> str | None:
    """Prepare the sandbox for a task: files and setup commands (SWE tasks: the repo too).

    `timeout` bounds the whole preparation, not each command. Returns the SWE
    baseline commit still to run when `defer_baseline` (`swe.prepare`), else None.
    """
    if task.kind == "swe":
        grading.warm_up()  # the evaluation's swebench import, done while the agent works
        return swe.prepare(sb, task, config or SandboxConfig(), cache_root, timeout, defer_baseline)
    budget = Budget(timeout, "provisioning")
    for path, content in task.files.items():
        sb.write_file(path, content.encode())
    swe.run_setup(sb, task.setup, budget)
    return None
