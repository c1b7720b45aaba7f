"""An episode's sandbox from the env hops' side: obtain it, record it, give it back.

``config.mode`` decides: ephemeral sandboxes are created for the episode and
destroyed at its end; persistent ones come from this worker's warm pool
(`megaflow.sandbox.pool`) and go back to it, their ``sandboxes`` row moving
``idle → in_use → releasing → idle``. Every move is a compare-and-set UPDATE, so
a reaper (`megaflow.reaper`) and a release never both act on one sandbox.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import update

from megaflow.db.models import SandboxRow, utcnow
from megaflow.envs.swe import sandbox_config
from megaflow.errors import SandboxError, SandboxNotFoundError
from megaflow.reaper import idle_lease_s, sandbox_labels
from megaflow.runtime import Runtime
from megaflow.sandbox.base import Sandbox, SandboxConfig

log = logging.getLogger(__name__)

#: Attempts at taking a pooled sandbox whose row a reaper claims at the same moment.
_ACQUIRE_TRIES = 3


def lease_until(rt: Runtime, run_id: str) -> dt.datetime:
    limits = rt.spec(run_id).limits
    return utcnow() + dt.timedelta(seconds=limits.episode_timeout_s + limits.eval_timeout_s + 300)


def config_for(rt: Runtime, ep) -> SandboxConfig:
    """The sandbox config of an episode: its run's, with the task's image on docker."""
    return sandbox_config(rt.spec(ep.run_id).sandbox, rt.task(ep.task_instance_id))


def obtain(rt: Runtime, ep, host: str) -> tuple[Sandbox, SandboxConfig]:
    """Create (ephemeral) or acquire (persistent) the episode's sandbox and record its row.

    The row is written before any setup runs, so a crash from here on leaves a row
    for the reaper; a crash inside ``create`` leaves a labelled sandbox it finds.

    Raises:
        SandboxError: the backend failed.
    """
    config = config_for(rt, ep)
    values = {"run_id": ep.run_id, "episode_id": ep.id, "state": "in_use",
              "lease_expires_at": lease_until(rt, ep.run_id), "heartbeat_at": utcnow()}
    if config.mode == "ephemeral":
        sb = rt.backend(config.type).create(config, sandbox_labels(host, ep.run_id, ep.id))
        try:
            with rt.session() as s:
                s.add(SandboxRow(id=sb.id, backend=config.type, host=host, image=config.image, mode=config.mode,
                                 **values))
        except BaseException:
            # Unrecorded (the database is down): the hop's retry makes another, so do not leave this one behind.
            _destroy_quietly(rt, sb.id, config.type)
            raise
        rt.adopt_sandbox(sb)
        return sb, config
    pool = rt.pool()
    for _ in range(_ACQUIRE_TRIES):
        sb = pool.acquire(config, sandbox_labels(host))
        with rt.session() as s:
            taken = s.execute(update(SandboxRow).where(
                SandboxRow.id == sb.id, SandboxRow.state == "idle", SandboxRow.destroyed_at.is_(None))
                .values(**values)).rowcount == 1
            if not taken and s.get(SandboxRow, sb.id) is None:
                s.add(SandboxRow(id=sb.id, backend=config.type, host=host, image=config.image, mode=config.mode,
                                 **values))
                taken = True
        if taken:
            rt.adopt_sandbox(sb)
            return sb, config
        log.info("pooled sandbox %s is being reaped; taking another", sb.id)
    raise SandboxError(f"no usable pooled sandbox after {_ACQUIRE_TRIES} tries")


def finish(rt: Runtime, ep) -> None:
    """The episode is done with its sandbox: destroy it, or reset it into the pool. Idempotent."""
    if not ep.sandbox_id:
        return
    config = config_for(rt, ep)
    if config.mode == "ephemeral":
        destroy(rt, ep.sandbox_id, config.type)
        return
    with rt.session() as s:
        # Only the episode that holds the sandbox may release it: a redelivered
        # release must not reset a sandbox the pool already gave to another episode.
        ours = s.execute(update(SandboxRow).where(
            SandboxRow.id == ep.sandbox_id, SandboxRow.episode_id == ep.id, SandboxRow.state == "in_use",
            SandboxRow.destroyed_at.is_(None)).values(state="releasing")).rowcount == 1
    if not ours:
        return
    try:
        sb = rt.open_sandbox(ep.sandbox_id, config)
    except SandboxNotFoundError:
        destroy(rt, ep.sandbox_id, config.type)
        return
    rt.forget_sandbox(ep.sandbox_id)

    def keep(_sb: Sandbox) -> bool:
        lease = utcnow() + dt.timedelta(seconds=idle_lease_s(rt.settings))
        with rt.session() as s:
            return s.execute(update(SandboxRow).where(
                SandboxRow.id == ep.sandbox_id, SandboxRow.state == "releasing", SandboxRow.destroyed_at.is_(None))
                .values(state="idle", run_id=None, episode_id=None, lease_expires_at=lease,
                        heartbeat_at=utcnow())).rowcount == 1

    rt.pool().release(sb, config, keep=keep)


def destroy(rt: Runtime, sandbox_id: str | None, kind: str) -> None:
    """Destroy a sandbox and mark its row; idempotent."""
    if not sandbox_id:
        return
    rt.forget_sandbox(sandbox_id)
    try:
        rt.backend(kind).destroy(sandbox_id)
    except SandboxError:
        log.warning("destroy of sandbox %s failed; the reaper will retry", sandbox_id, exc_info=True)
        return
    with rt.session() as s:
        s.execute(update(SandboxRow).where(SandboxRow.id == sandbox_id, SandboxRow.destroyed_at.is_(None))
                  .values(state="destroyed", destroyed_at=utcnow()))


def _destroy_quietly(rt: Runtime, sandbox_id: str, kind: str) -> None:
    try:
        rt.backend(kind).destroy(sandbox_id)
    except Exception:  # the reaper finds it by its labels
        log.warning("could not destroy unrecorded sandbox %s; the reaper will", sandbox_id, exc_info=True)
