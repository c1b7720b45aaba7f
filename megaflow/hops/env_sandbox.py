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
import uuid

from sqlalchemy import select, update

from megaflow.db.models import SandboxRow, utcnow
from megaflow.errors import SandboxError, SandboxNotFoundError
from megaflow.reaper import CLAIM_PREFIX, EPISODE_LABEL, HOST_LABEL, idle_lease_s, sandbox_labels
from megaflow.runtime import Runtime
from megaflow.sandbox.base import Sandbox, SandboxConfig

log = logging.getLogger(__name__)

#: Attempts at taking a pooled sandbox whose row a reaper claims at the same moment.
_ACQUIRE_TRIES = 3


def lease_until(rt: Runtime, run_id: str) -> dt.datetime:
    limits = rt.spec(run_id).limits
    return utcnow() + dt.timedelta(seconds=limits.episode_timeout_s + limits.eval_timeout_s + 300)


def obtain(rt: Runtime, ep, host: str, defer_seed: bool = False) -> tuple[Sandbox, SandboxConfig]:
    """Create (ephemeral) or acquire (persistent) the episode's sandbox and record its row.

    One sandbox per episode per host, so never more sandboxes than the host's
    slots, even under redelivered provisions: first, whatever an earlier delivery
    of this episode left here (a killed provision or rebuild) is destroyed — the
    rows it recorded and the sandboxes labelled with the episode, recorded or
    not (`clear_earlier`). Then an ephemeral sandbox's row is claimed (state
    ``creating``, a placeholder id) *before* the container is created, and given
    the sandbox's id once it exists; a crash in between leaves that row and a
    labelled sandbox, both found by the next delivery (or the reaper).

    With `defer_seed`, a new docker sandbox's work directory is filled by its first
    exec (`DockerBackend.create`): the caller runs one, or `settle`, before its hop ends.

    Raises:
        SandboxError: the backend failed.
    """
    config = rt.sandbox_config(ep)
    values = {"run_id": ep.run_id, "episode_id": ep.id, "state": "in_use",
              "lease_expires_at": lease_until(rt, ep.run_id), "heartbeat_at": utcnow()}
    clear_earlier(rt, ep.id, host, config.type)
    if config.mode == "ephemeral":
        claim = f"{CLAIM_PREFIX}{uuid.uuid4().hex}"
        with rt.session() as s:
            s.add(SandboxRow(id=claim, backend=config.type, host=host, image=config.image, mode=config.mode,
                             **{**values, "state": "creating"}))
        try:
            backend, labels = rt.backend(config.type), sandbox_labels(host, ep.run_id, ep.id)
            deferred = defer_seed and config.type == "docker"
            sb = backend.create(config, labels, defer_seed=True) if deferred else backend.create(config, labels)
        except BaseException:
            _close_rows(rt, [claim])
            raise
        try:
            with rt.session() as s:
                s.execute(update(SandboxRow).where(SandboxRow.id == claim).values(id=sb.id, state="in_use"))
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


def settle(sb: Sandbox) -> None:
    """Fill a sandbox's deferred work directory now, if it is still pending (docker; others have none).

    Before the provision hop ends: a later hop may attach from another process,
    which cannot know that the directory was never filled.
    """
    pending = getattr(sb, "settle", None)
    if pending is not None:
        pending()


def clear_earlier(rt: Runtime, episode_id: str, host: str, kind: str) -> list[str]:
    """Destroy what earlier deliveries of this episode left on this host; returns the sandbox ids destroyed.

    Called before the episode gets a sandbox here, when it has none in use (its
    recorded ``sandbox_id`` is unset or gone): any sandbox of the episode still
    around is a leftover of a delivery that died (nobody else uses it), whether its
    row says ``creating`` or ``in_use`` or it has no row at all (killed between
    create and record).
    """
    with rt.session() as s:
        rows = s.execute(select(SandboxRow.id, SandboxRow.state).where(
            SandboxRow.episode_id == episode_id, SandboxRow.host == host, SandboxRow.destroyed_at.is_(None),
            SandboxRow.state.in_(("creating", "in_use", "releasing")))).all()
    claims = [sid for sid, state in rows if state == "creating" or sid.startswith(CLAIM_PREFIX)]
    ids = {sid for sid, _ in rows if sid not in claims}
    try:
        ids |= set(rt.backend(kind).list_ids({HOST_LABEL: host, EPISODE_LABEL: episode_id}))
    except SandboxError:
        log.warning("could not list the sandboxes of episode %s; the reaper will find any left", episode_id,
                    exc_info=True)
    for sandbox_id in sorted(ids):
        log.warning("episode %s: destroying sandbox %s left by an earlier delivery", episode_id, sandbox_id)
        destroy(rt, sandbox_id, kind)
    _close_rows(rt, claims)
    return sorted(ids)


def _close_rows(rt: Runtime, ids: list[str]) -> None:
    """Mark rows destroyed that hold no sandbox (claims whose create never finished)."""
    if not ids:
        return
    try:
        with rt.session() as s:
            s.execute(update(SandboxRow).where(SandboxRow.id.in_(ids), SandboxRow.destroyed_at.is_(None))
                      .values(state="destroyed", destroyed_at=utcnow()))
    except Exception:  # noqa: BLE001 - a claim row left open expires with its lease; the reaper closes it
        log.warning("could not close sandbox claims %s", ids, exc_info=True)


def finish(rt: Runtime, ep) -> None:
    """The episode is done with its sandbox: destroy it, or reset it into the pool. Idempotent."""
    if not ep.sandbox_id:
        return
    config = rt.sandbox_config(ep)
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
