"""Environment hops (env queues): provision, exec, evaluate, release.

Provision runs on any env worker (queue ``env``); the sandbox then lives on that
worker's host, and every later hop of the episode goes to ``env.<host>``.

Every env hop runs only on its episode's host (`env_rebuild.fenced_episode`); an
episode re-homed after its host died gets its sandbox rebuilt on the new host by
the first hop that needs it (`env_rebuild.rebuild`: setup, then its commands replayed).
"""

from __future__ import annotations

import logging
import random
import time

from sqlalchemy import bindparam, select, update

from megaflow.contract import HopResult, failure
from megaflow.db import states
from megaflow.db.models import Episode, Step
from megaflow.db.sql import Tracked, prepared, update_where
from megaflow.db.states import ExitStatus
from megaflow.deadlines import Budget, max_phase_s, remaining_s
from megaflow.envs import grading, swe
from megaflow.envs.grading import CHECK_FILE
from megaflow.envs.prepare import setup
from megaflow.envs.swe import SetupError
from megaflow.errors import SandboxError, SandboxNotFoundError
from megaflow.hops import cli_launch, exec_journal
from megaflow.hops.base import run_hop
from megaflow.hops.driver import command_at_provision
from megaflow.hops.env_rebuild import fenced_episode, on_host, rebuild, record_rebuild, replay_plan
from megaflow.hops.env_sandbox import clear_earlier, destroy, finish, obtain, settle
from megaflow.hops.rows import insert_step
from megaflow.runtime import get_runtime
from megaflow.sandbox.base import ExecResult, Sandbox
from megaflow.sanitize import storable

log = logging.getLogger(__name__)

MAX_RETRIES = 3


def _episode(s, episode_id: str, host: str):
    """The episode row, readable after the transaction; `Rehomed` if it lives elsewhere."""
    return fenced_episode(s, episode_id, host)


def _update_step(conn):
    t = Step.__table__
    return update(t).where(t.c.episode_id == bindparam("k_episode_id"), t.c.index == bindparam("k_index")).values(
        {c: bindparam(f"v_{c}", type_=t.c[c].type) for c in ("observation", "exit_code", "exec_s")})


def _select_action(conn):
    t = Step.__table__
    return select(t.c.action).where(t.c.episode_id == bindparam("k_episode_id"), t.c.index == bindparam("k_index"))


def _infra(hop: str, step: int, exc: Exception | str, exit_status: ExitStatus) -> tuple[dict, None]:
    return failure(hop, step, exc, exit_status).wire(), None


def _retry_or_fail(task, hop: str, step: int, exc: Exception, exit_status: ExitStatus):
    if task.request.retries < MAX_RETRIES:
        raise task.retry(exc=exc, countdown=min(30.0, 2 ** task.request.retries) * (0.5 + random.random()))
    return _infra(hop, step, exc, exit_status)


def provision_task(self, episode_id: str, step: int = 0):
    rt = get_runtime(self.app)
    host = rt.settings.host

    def work(ep):
        spec, task = rt.spec(ep.run_id), rt.task(ep.task_instance_id)
        # One deadline for the whole phase: creating the sandbox and every setup command.
        deadline = time.monotonic() + spec.limits.provision_timeout_s
        try:
            # Ephemeral: created; persistent: from the warm pool. Recorded either way.
            # A SWE task's first exec (its baseline commit) also fills the work directory.
            sb, config = obtain(rt, ep, host, defer_seed=task.kind == "swe")
        except SandboxError as exc:
            return _retry_or_fail(self, "provision", step, exc, ExitStatus.PROVISION_FAILED)
        try:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SetupError(f"creating the sandbox used up the {spec.limits.provision_timeout_s:g}s "
                                 "provisioning deadline")
            baseline = setup(sb, task, left, config=config, cache_root=rt.settings.data_dir, defer_baseline=True)
            ran = run_first_command(rt, ep, task, sb, config, baseline, deadline)
            settle(sb)
        except (SandboxError, SetupError, OSError, TimeoutError) as exc:
            destroy(rt, sb.id, config.type)
            return _infra("provision", step, exc, ExitStatus.SETUP_FAILED)

        def write(s):
            update_where(s.connection(), Episode.__table__, {"id": episode_id}, {"sandbox_id": sb.id, "host": host})
            if ran is not None:
                cmd, result = ran
                insert_step(s.connection(), episode_id, 0, rt.agent(ep.run_id).start(task), action=cmd,
                            observation=storable(result.output), exit_code=result.exit_code,
                            exec_s=result.duration_s)

        exit_code = ran[1].exit_code if ran is not None else None
        return HopResult(hop="provision", step=step, host=host, exit_code=exit_code).wire(), write

    return on_host(self, rt, episode_id, lambda: run_hop(rt, self.request, (episode_id, step, "provision"), work,
                                                         load=lambda s: _episode(s, episode_id, host)))


def run_first_command(rt, ep, task, sb: Sandbox, config, baseline: str | None = None,
                      deadline: float | None = None) -> tuple[str, ExecResult] | None:
    """Step 0's command run in the new sandbox (`driver.command_at_provision`), or None: its exec hop runs it.

    Provision and command share one task, so both deadlines must fit its time
    limit together. A redelivered provision makes a fresh sandbox, so the command
    never runs twice in one; it is journaled all the same, so that an exec hop
    sent after a sandbox error here knows whether it ran. A SWE task's `baseline`
    commit (`swe.prepare`) runs first, in the same exec when there is a command
    (one docker round trip fewer, #15 point 7), before the provisioning `deadline`.

    Raises:
        SetupError: the baseline failed.
        SandboxError: the sandbox failed while the baseline was pending (not known to have run).
    """
    spec = rt.spec(ep.run_id)
    cmd = command_at_provision(spec, task, rt.agent(ep.run_id))
    setup_left = max(1.0, (deadline or time.monotonic()) - time.monotonic())
    if cmd is None or spec.limits.provision_timeout_s + spec.limits.exec_timeout_s > max_phase_s(rt.settings):
        if baseline is not None:
            swe.run_setup(sb, [baseline], Budget(setup_left, "provisioning"))
        return None
    journaled = exec_journal.applies(config.type)
    shell, mark = exec_journal.wrap(cmd, "0") if journaled else cmd, None
    if baseline is not None:
        shell, mark = swe.with_baseline(baseline, shell)
    timeout = remaining_s(ep.deadline_at, spec.limits.exec_timeout_s)
    try:
        result = sb.exec(shell, timeout=timeout + (setup_left if baseline is not None else 0.0))
    except SandboxError as exc:
        if baseline is not None:
            raise
        log.warning("episode %s: step 0 did not run at provision (%s); its exec hop will run it", ep.id, exc)
        return None
    if mark is not None and (failed := swe.baseline_failed(result, mark)) is not None:
        raise failed
    if journaled and exec_journal.replay_of(result) is not None:
        return None
    return cmd, result


def exec_task(self, episode_id: str, step: int):
    rt = get_runtime(self.app)

    def load(s):
        conn = s.connection()
        action = conn.execute(prepared(conn, "exec.action", _select_action),
                              {"k_episode_id": episode_id, "k_index": step}).scalar()
        ep = _episode(s, episode_id, rt.settings.host)
        # Re-homed here from a dead host: no sandbox yet; it is rebuilt from these commands.
        return ep, action, (replay_plan(s, episode_id) if ep.sandbox_id is None else None)

    def work(ctx):
        ep, action, plan = ctx
        spec = rt.spec(ep.run_id)
        if spec.agent.type == "cli" and step == 0:  # start the agent program; the episode parks
            return cli_launch.launch(self.app, rt, ep, step, action, lambda s, out, code: s.connection().execute(
                prepared(s.connection(), "exec.step", _update_step), {
                    "k_episode_id": episode_id, "k_index": step, "v_observation": out, "v_exit_code": code,
                    "v_exec_s": 0.0}))
        journaled = exec_journal.applies(spec.sandbox.type)
        # A command may not outlive its episode's deadline (the next decision ends the episode).
        timeout = remaining_s(ep.deadline_at, spec.limits.exec_timeout_s)
        try:
            result, rebuilt = with_sandbox(rt, ep, plan, lambda sb: sb.exec(
                exec_journal.wrap(action, str(step)) if journaled else action, timeout=timeout))
        except SandboxError as exc:
            return _infra("exec", step, exc, ExitStatus.SANDBOX_LOST)
        except (SetupError, OSError, TimeoutError) as exc:  # rebuilding the sandbox failed
            return _infra("exec", step, exc, ExitStatus.REBUILD_FAILED)
        cache = exec_journal.results_cache(rt)
        replay = exec_journal.replay_of(result) if journaled else None
        if replay is not None:
            # An earlier delivery of this very hop ran (or began) the command: never twice.
            result = cache.get(ep.sandbox_id, step)
            if result is None:
                what, code = replay
                log.warning("exec %s/%d: an earlier delivery %s the command; not running it again", episode_id, step,
                            "finished" if what == "done" else "was cut off in")
                if what != "done":
                    return _infra("exec", step, "the command was cut off by a worker failure; it may have partly "
                                  "run", ExitStatus.EXEC_INTERRUPTED)
                # It ran once, to the end: the episode goes on, told that the output is gone.
                result = exec_journal.lost_output(code)
        else:
            cache.put(ep.sandbox_id, step, result)
        observation = storable(result.output)

        # No lease renewal here: the lease taken at provision already outlives the
        # episode's deadline, and a write per command is a tenth of a hop's cost.
        def write(s):
            conn = s.connection()
            conn.execute(prepared(conn, "exec.step", _update_step), {
                "k_episode_id": episode_id, "k_index": step, "v_observation": observation,
                "v_exit_code": result.exit_code, "v_exec_s": result.duration_s})
            if rebuilt:
                record_rebuild(s, ep, rebuilt)

        return HopResult(hop="exec", step=step, exit_code=result.exit_code, host=rt.settings.host).wire(), write

    return on_host(self, rt, episode_id, lambda: run_hop(rt, self.request, (episode_id, step, "exec"), work,
                                                         load=load))


def evaluate(sb: Sandbox, task, timeout: float) -> tuple[float, str | None]:
    """Reward 1.0 iff the task's checks pass; also the agent's patch for SWE tasks (`grading.evaluate_task`)."""
    result = grading.evaluate_task(sb, task, timeout, CHECK_FILE)
    return result.reward, result.patch


def evaluate_task(self, episode_id: str, step: int):
    rt = get_runtime(self.app)

    def load(s):
        ep = _episode(s, episode_id, rt.settings.host)
        return ep, (replay_plan(s, episode_id) if ep.sandbox_id is None else None)

    def work(ctx):
        ep, plan = ctx
        spec, task = rt.spec(ep.run_id), rt.task(ep.task_instance_id)
        try:
            # eval_timeout_s bounds the whole evaluation (grading.evaluate shares it between its commands).
            graded, rebuilt = with_sandbox(rt, ep, plan, lambda sb: grading.evaluate_task(
                sb, task, spec.limits.eval_timeout_s, CHECK_FILE))
            reward = graded.reward
        except SandboxError as exc:
            return _infra("evaluate", step, exc, ExitStatus.EVALUATION_FAILED)
        except (SetupError, OSError, TimeoutError) as exc:  # rebuilding the sandbox failed
            return _infra("evaluate", step, exc, ExitStatus.REBUILD_FAILED)
        # The sandbox is not destroyed here but once the reward is recorded (below):
        # a worker lost in between would otherwise throw a computed reward away, and
        # the redelivered evaluate would meet no sandbox.

        def write(s):
            update_where(s.connection(), Episode.__table__, {"id": episode_id},
                         {"reward": reward, "patch": storable(graded.patch), "grading": graded.record(),
                          "test_log": graded.test_log})
            if rebuilt:
                record_rebuild(s, ep, rebuilt)

        return HopResult(hop="evaluate", step=step, reward=reward, host=rt.settings.host).wire(), write

    def run():
        result = run_hop(rt, self.request, (episode_id, step, "evaluate"), work, load=load)
        # Recorded (now, or by an earlier delivery that died before its acknowledgement):
        # the episode is done with its sandbox. Idempotent, so a redelivery does it again.
        finish_quietly(rt, episode_id)
        return result

    return on_host(self, rt, episode_id, run)


def with_sandbox(rt, ep, plan, use):
    """`use(sandbox)` on the episode's sandbox; returns its result and what `record_rebuild` records (or None).

    The sandbox is rebuilt on this host (setup, then the episode's recorded commands
    replayed) when the episode was re-homed here (`plan` given), and also when its
    sandbox is gone (a redelivered hop whose earlier delivery's sandbox was lost,
    destroyed or reaped): such a hop gets a rebuilt sandbox, never a
    `SandboxNotFoundError`. Only once: a sandbox lost again is an infra failure.

    Raises:
        SandboxError, SetupError, OSError, TimeoutError: no sandbox could be had.
    """
    host = rt.settings.host
    if plan is not None:  # re-homed here from a dead host
        sb, rebuilt = rebuild(rt, ep, plan, host)
        return use(sb), rebuilt
    spec = rt.spec(ep.run_id)
    try:
        return use(rt.open_sandbox(ep.sandbox_id, spec.sandbox)), None
    except SandboxNotFoundError as exc:
        if ep.state in states.TERMINAL:  # a stale hop of an ended episode: nothing to rebuild for
            raise
        gone = ep.sandbox_id
        log.warning("episode %s: its sandbox %s is gone (%s); rebuilding it", ep.id, gone, exc)
    rt.forget_sandbox(gone)
    with rt.session(readonly=True) as s:
        plan = replay_plan(s, ep.id)
    ep.sandbox_id = None
    sb, rebuilt = rebuild(rt, ep, plan, host)
    rebuilt["replaces"] = gone
    return use(sb), rebuilt


def finish_quietly(rt, episode_id: str) -> None:
    """`finish` the episode's sandbox as it is recorded now; a failure is left to the reaper.

    After a hop's result is recorded nothing may fail the task: its continuation
    would never be sent and the episode would stay where it is.
    """
    try:
        with rt.session(readonly=True) as s:
            row = s.execute(select(Episode.__table__).where(Episode.id == episode_id)).first()
        if row is not None:
            finish(rt, Tracked(row._mapping))
    except Exception:  # noqa: BLE001 - see above
        log.warning("episode %s: its sandbox was not given back; the reaper will", episode_id, exc_info=True)


def release_task(self, episode_id: str, step: int):
    rt = get_runtime(self.app)

    def work(ep):
        finish(rt, ep)
        if not ep.sandbox_id:
            # Ended before its provision recorded a sandbox: clear what killed deliveries left.
            clear_earlier(rt, episode_id, rt.settings.host, rt.sandbox_config(ep).type)
        return HopResult(hop="release", step=step, host=rt.settings.host).wire(), None

    return on_host(self, rt, episode_id, lambda: run_hop(rt, self.request, (episode_id, step, "release"), work,
                                                         load=lambda s: _episode(s, episode_id,
                                                                                 rt.settings.host)))
