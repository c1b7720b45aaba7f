"""Host-bound hops after host recovery: run only where the episode lives; rebuild its sandbox there.

`megaflow.scheduler.recovery` moves the episodes of a dead env host to live ones
(``episodes.host`` = new host, ``sandbox_id`` = NULL). Here, the env hops' side:

* **Fence.** A host-bound hop reads its episode in its claim's transaction with a
  share lock (`fenced_episode`), so re-homing waits for the claim to commit and
  then orphans it, or the claim sees the new host. A hop whose episode lives on
  another host (a message a not-quite-dead host still held) raises `Rehomed`;
  one whose claim was orphaned while it worked gets ``ledger.ClaimLost`` at its
  finish. Either way `on_host` forwards the message to the episode's host under a
  fresh task id and drops this delivery: nothing is recorded twice, and a command
  it may have run touched only the abandoned sandbox.
* **Rebuild.** A hop that finds its running episode without a sandbox makes one
  here (obtain + setup, as provision does) and replays the episode's executed
  commands in step order (`replay_plan`: steps whose exec hop is recorded, or step 0
  run by its provision hop), so the sandbox is in the state those commands left;
  then it does its own work.
"""

from __future__ import annotations

import logging
import time
import uuid

from celery.exceptions import Ignore
from sqlalchemy import and_, bindparam, or_, select, update

from megaflow.db.models import Episode, Hop, SandboxRow, Step, utcnow
from megaflow.db.sql import Tracked, prepared
from megaflow.events import emit
from megaflow.db import ledger
from queues import topology

log = logging.getLogger(__name__)


class Rehomed(Exception):
    """The episode lives on another env host now."""

    def __init__(self, host: str | None):
        super().__init__(f"episode lives on host {host}")
        self.host = host


def fenced_episode(s, episode_id: str, host: str) -> Tracked:
    """The episode row (columns as attributes), share-locked for this transaction; `Rehomed` if it lives elsewhere.

    An episode not yet placed (``host`` NULL: placement off, provision from the
    shared queue) belongs to whoever provisions it.
    """
    # Every env hop reads it: a Core statement built once, its row as a plain object
    # (no ORM loading; callers read columns and may set one on their copy).
    conn = s.connection()
    row = conn.execute(prepared(conn, "env.fenced_episode", _select_fenced), {"k_id": episode_id}).one()
    ep = Tracked(row._mapping)
    if ep.host is not None and ep.host != host:
        raise Rehomed(ep.host)
    return ep


def _select_fenced(conn):
    t = Episode.__table__
    return select(t).where(t.c.id == bindparam("k_id")).with_for_update(read=True)


def replay_plan(s, episode_id: str) -> list[tuple[int, str, int | None]]:
    """(step, command, recorded exit code) of every command the episode executed, in order.

    A command ran when its step's exec hop is recorded, or, for step 0, when its
    provision hop recorded it with its exit code (`driver.command_at_provision`).
    """
    def recorded(hop: str):
        return select(Hop.subject_id).where(Hop.subject_id == Step.episode_id, Hop.step_index == Step.index,
                                            Hop.hop == hop, Hop.status == "done").exists()

    rows = s.execute(
        select(Step.index, Step.action, Step.exit_code)
        .where(Step.episode_id == episode_id, Step.action.is_not(None),
               or_(recorded("exec"), and_(Step.index == 0, Step.exit_code.is_not(None), recorded("provision"))))
        .order_by(Step.index)).all()
    return [(i, a, c) for i, a, c in rows]


def rebuild(rt, ep: Tracked, plan: list[tuple[int, str, int | None]], host: str):
    """A new sandbox for a re-homed episode, in the state its executed commands left.

    The whole rebuild shares one budget that leaves the hop room for its own command
    within its task time limit (`megaflow.deadlines`).

    Returns:
        The sandbox (its row recorded, ``ep.sandbox_id`` set on the detached row) and what
        `record_rebuild` records.

    Raises:
        SandboxError, SetupError, OSError, TimeoutError: the sandbox could not be made or
        prepared in time (it is destroyed).
    """
    from megaflow.deadlines import Budget, max_phase_s
    from megaflow.hops import exec_journal
    from megaflow.envs.prepare import setup
    from megaflow.hops.env_sandbox import destroy, obtain

    spec, task = rt.spec(ep.run_id), rt.task(ep.task_instance_id)
    limits = spec.limits
    t0 = time.monotonic()
    budget = Budget(max(10.0, max_phase_s(rt.settings) - limits.exec_timeout_s), "rebuilding the sandbox")
    sb, config = obtain(rt, ep, host)
    differ = []
    try:
        setup(sb, task, min(limits.provision_timeout_s, budget.left()), config=config,
              cache_root=rt.settings.data_dir)
        journaled = exec_journal.applies(config.type)
        for done, (index, action, code) in enumerate(plan):
            if budget.exhausted:
                raise TimeoutError(f"{budget.message()} after replaying {done} of {len(plan)} commands")
            cmd = exec_journal.wrap(action, str(index)) if journaled else action
            result = sb.exec(cmd, timeout=min(limits.exec_timeout_s, budget.left()))
            if code is not None and result.exit_code != code:
                differ.append(index)
    except Exception:
        destroy(rt, sb.id, config.type)
        raise
    ep.sandbox_id = sb.id
    seconds = time.monotonic() - t0
    if differ:
        log.warning("episode %s: replayed steps %s exited differently than recorded", ep.id, differ)
    log.info("episode %s: sandbox rebuilt on %s by replaying %d commands in %.1fs", ep.id, host, len(plan),
             seconds)
    return sb, {"host": host, "sandbox": sb.id, "replayed": len(plan), "exit_code_differs": differ,
                "seconds": round(seconds, 3)}


def record_rebuild(s, ep: Tracked, info: dict) -> None:
    """In the hop's recording transaction: the episode's new sandbox, and an event.

    ``info["replaces"]``: the sandbox that was gone (`env_hop.with_sandbox`); its row is closed.
    """
    gone = info.get("replaces")
    was = Episode.sandbox_id.is_(None) if gone is None else or_(Episode.sandbox_id.is_(None),
                                                                 Episode.sandbox_id == gone)
    s.execute(update(Episode).where(Episode.id == ep.id, was).values(sandbox_id=info["sandbox"]))
    if gone is not None:
        s.execute(update(SandboxRow).where(SandboxRow.id == gone, SandboxRow.destroyed_at.is_(None))
                  .values(state="destroyed", destroyed_at=utcnow()))
    emit(s, "episode.rebuilt", ep.run_id, ep.id, info)


def on_host(task, rt, episode_id: str, run):
    """Run a host-bound hop; if its episode lives elsewhere now, forward the message there and drop it."""
    try:
        return run()
    except (Rehomed, ledger.ClaimLost) as why:
        forward(task, rt, episode_id, why)
        raise Ignore() from None


def forward(task, rt, episode_id: str, why: Exception) -> None:
    """Send this hop (same arguments and continuation, fresh task id) to the episode's host."""
    with rt.session() as s:
        host = s.execute(select(Episode.host).where(Episode.id == episode_id)).scalar()
    if host is None:  # cannot happen for a fenced hop; do not lose the message
        raise RuntimeError(f"episode {episode_id} has no host to forward its hop to") from why
    queue = topology.env_host_queue(host).name
    request = task.request
    sig = task.signature_from_request(request, queue=queue, exchange=topology.EXCHANGE.name, routing_key=queue,
                                      task_id=str(uuid.uuid4()))
    sig.apply_async()
    log.warning("%s[%s] of episode %s arrived on %s but the episode lives on %s (%s): forwarded",
                task.name, request.id, episode_id, rt.settings.host, host, type(why).__name__)
    with rt.session() as s:
        emit(s, "hop.forwarded", subject_id=episode_id,
             data={"task": task.name, "from": rt.settings.host, "to": host, "why": type(why).__name__})
