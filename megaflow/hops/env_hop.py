"""Environment hops (env queues): provision, exec, evaluate, release.

Provision runs on any env worker (queue ``env``); the sandbox then lives on that
worker's host, and every later hop of the episode goes to ``env.<host>``.
"""

from __future__ import annotations

import logging
import random

from sqlalchemy import select, update

from megaflow.db.models import Episode, Step
from megaflow.envs import swe
from megaflow.envs.swe import SetupError
from megaflow.errors import SandboxError
from megaflow.hops.base import run_hop
from megaflow.hops.env_sandbox import destroy, finish, obtain
from megaflow.runtime import get_runtime
from megaflow.sandbox.base import Sandbox, SandboxConfig

log = logging.getLogger(__name__)

MAX_RETRIES = 3
CHECK_FILE = ".megaflow_check.sh"


def _episode(s, episode_id: str) -> Episode:
    """The episode row, detached so it can be read after the transaction."""
    ep = s.get(Episode, episode_id)
    s.expunge(ep)
    return ep


def _infra(hop: str, step: int, exc: Exception, exit_status: str) -> tuple[dict, None]:
    return {"hop": hop, "step": step, "error": f"{type(exc).__name__}: {exc}", "kind": "infra",
            "exit_status": exit_status}, None


def _retry_or_fail(task, hop: str, step: int, exc: Exception, exit_status: str):
    if task.request.retries < MAX_RETRIES:
        raise task.retry(exc=exc, countdown=min(30.0, 2 ** task.request.retries) * (0.5 + random.random()))
    return _infra(hop, step, exc, exit_status)


def provision_task(self, episode_id: str, step: int = 0):
    rt = get_runtime(self.app)
    host = rt.settings.host

    def work(ep):
        spec, task = rt.spec(ep.run_id), rt.task(ep.task_instance_id)
        try:
            # Ephemeral: created; persistent: from the warm pool. Recorded either way.
            sb, config = obtain(rt, ep, host)
        except SandboxError as exc:
            return _retry_or_fail(self, "provision", step, exc, "provision_failed")
        try:
            setup(sb, task, spec.limits.provision_timeout_s, config=config, cache_root=rt.settings.data_dir)
        except (SandboxError, SetupError, OSError) as exc:
            destroy(rt, sb.id, config.type)
            return _infra("provision", step, exc, "setup_failed")

        def write(s):
            s.execute(update(Episode).where(Episode.id == episode_id).values(sandbox_id=sb.id, host=host))

        return {"hop": "provision", "step": step}, write

    return run_hop(rt, self.request, (episode_id, step, "provision"), work,
                   load=lambda s: _episode(s, episode_id))


def setup(sb: Sandbox, task, timeout: float, config: SandboxConfig | None = None, cache_root=None) -> None:
    """Prepare the sandbox for a task: files and setup commands (SWE tasks: the repo too)."""
    if task.kind == "swe":
        swe.prepare(sb, task, config or SandboxConfig(), cache_root, timeout)
        return
    for path, content in task.files.items():
        sb.write_file(path, content.encode())
    for cmd in task.setup:
        r = sb.exec(cmd, timeout=timeout)
        if r.exit_code != 0:
            raise SetupError(f"setup command {cmd!r} exited {r.exit_code}: {(r.stderr or r.stdout)[-500:]}")


def exec_task(self, episode_id: str, step: int):
    rt = get_runtime(self.app)

    def load(s):
        action = s.execute(select(Step.action).where(Step.episode_id == episode_id, Step.index == step)).scalar()
        return _episode(s, episode_id), action

    def work(ctx):
        ep, action = ctx
        spec = rt.spec(ep.run_id)
        try:
            result = rt.open_sandbox(ep.sandbox_id, spec.sandbox).exec(action, timeout=spec.limits.exec_timeout_s)
        except SandboxError as exc:
            return _infra("exec", step, exc, "sandbox_lost")
        observation = result.output

        # No lease renewal here: the lease taken at provision already outlives the
        # episode's deadline, and a write per command is a tenth of a hop's cost.
        def write(s):
            s.execute(update(Step).where(Step.episode_id == episode_id, Step.index == step).values(
                observation=observation, exit_code=result.exit_code, exec_s=result.duration_s))

        return {"hop": "exec", "step": step, "exit_code": result.exit_code}, write

    return run_hop(rt, self.request, (episode_id, step, "exec"), work, load=load)


def evaluate(sb: Sandbox, task, timeout: float) -> tuple[float, str | None]:
    """Reward 1.0 iff the task's checks pass; also the agent's patch for SWE tasks."""
    if task.kind == "terminal":
        sb.write_file(CHECK_FILE, task.check.encode())
        return (1.0 if sb.exec(f"bash {CHECK_FILE}", timeout=timeout).exit_code == 0 else 0.0), None
    return swe.evaluate(sb, task, timeout)


def evaluate_task(self, episode_id: str, step: int):
    rt = get_runtime(self.app)

    def work(ep):
        spec, task = rt.spec(ep.run_id), rt.task(ep.task_instance_id)
        try:
            reward, patch = evaluate(rt.open_sandbox(ep.sandbox_id, spec.sandbox), task, spec.limits.eval_timeout_s)
        except SandboxError as exc:
            destroy(rt, ep.sandbox_id, spec.sandbox.type)
            return _infra("evaluate", step, exc, "evaluation_failed")
        finish(rt, ep)

        def write(s):
            s.execute(update(Episode).where(Episode.id == episode_id).values(reward=reward, patch=patch))

        return {"hop": "evaluate", "step": step, "reward": reward}, write

    return run_hop(rt, self.request, (episode_id, step, "evaluate"), work,
                   load=lambda s: _episode(s, episode_id))


def release_task(self, episode_id: str, step: int):
    rt = get_runtime(self.app)

    def work(ep):
        finish(rt, ep)
        return {"hop": "release", "step": step}, None

    return run_hop(rt, self.request, (episode_id, step, "release"), work,
                   load=lambda s: _episode(s, episode_id))
