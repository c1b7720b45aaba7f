"""The episode task (``megaflow.episode``, agent queue): one decision between hops.

An episode is one Celery chord member. Its task reads the previous hop's
`HopResult`, has the `Driver` decide inside one transaction (recorded in the
ledger, so a redelivery replays it), then hands its chord membership on to
``hop | episode`` (`routing.continue_with`) — or, once the episode has ended,
gives its slots back and returns the episode's `Summary` to its group's chord.
"""

from __future__ import annotations

import logging

from celery.exceptions import Ignore, Retry, SoftTimeLimitExceeded
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from megaflow.contract import Decision, HopResult, Summary
from megaflow.db import ledger, states
from megaflow.hops.base import run_hop
from megaflow.hops.driver import Driver
from megaflow.hops.routing import continue_with, next_signature
from megaflow.hops.rows import SqlRows
from megaflow.runtime import Runtime, get_runtime
from megaflow.scheduler import admission

log = logging.getLogger(__name__)


def driver_for(rt: Runtime, s: Session, episode_id: str, parking: dict | None = None) -> Driver:
    """A `Driver` for the episode on session `s`, with the run's spec, task and scaffold from `rt`'s caches."""
    rows = SqlRows(s, episode_id, rt.settings, claim=lambda ep: admission.claim_of(rt, ep))
    ep = rows.ep
    return Driver(rows, rt.spec(ep.run_id), rt.task(ep.task_instance_id), rt.agent(ep.run_id), parking)


def episode_task(self, prev, episode_id):
    """Celery task body for ``megaflow.episode``.

    Nothing unexpected escapes it: a failed episode task would leave its episode
    in flight with no message to move it, and its chord member returned as a
    failure. Anything raised outside the decision's own crash handling (sending
    the next hop after the broker's retries, a bug) ends the episode
    ``infra_failed`` (``agent_crashed``) and returns it to its chord.
    """
    prev = HopResult.received(prev)
    try:
        return _episode_step(self, prev, episode_id)
    except (Retry, Ignore, OperationalError, InterfaceError, SoftTimeLimitExceeded):
        raise
    except Exception as exc:  # noqa: BLE001 - see above
        log.error("episode %s: its task failed after %s; ending the episode", episode_id, prev.hop, exc_info=True)
        return _end_crashed(self, episode_id, prev.step, exc)


def _end_crashed(task, episode_id: str, step: int, exc: Exception):
    """End the episode ``infra_failed`` in a transaction of its own; its summary for the chord (or the release)."""
    rt = get_runtime(task.app)
    rt.warm(episode_id)
    with rt.session() as s:
        driver = driver_for(rt, s, episode_id)
        decision = driver.crashed(step, exc)
        driver.rows.save()
    if decision.next is not None and task.request.chord is None:
        return None  # handed to a continuation already: it returns to the chord
    return _carry_out(task, rt, episode_id, decision, replayed=False)


def _episode_step(self, prev: HopResult, episode_id: str):
    rt = get_runtime(self.app)
    key = (episode_id, prev.step, f"agent.{prev.hop}")
    fresh: dict = {}

    def work(_ctx):
        rt.warm(episode_id)

        def write(s: Session):
            try:
                driver = driver_for(rt, s, episode_id, parking=admission.parking_of(self.request))
                fresh.update(driver.decide(prev).wire())
                driver.rows.save()
            except (OperationalError, InterfaceError, IntegrityError):
                # Lost connections retry; a collision is a replay (run_hop replays the record).
                raise
            except Exception as exc:
                raise DecisionCrashed(exc) from exc
        return fresh, write

    try:
        recorded = run_hop(rt, self.request, key, work, side_effects=False, precheck=False)
    except DecisionCrashed as crash:
        # The crashed decision's transaction is rolled back whole (ledger row too);
        # record the episode's end in a new one. No savepoint on the common path.
        cause = crash.__cause__
        log.error("decision for episode %s after %s crashed: %r", episode_id, prev.hop, cause)

        def crashed(_ctx):
            def write(s: Session):
                fresh.update(driver_for(rt, s, episode_id).crashed(key[1], cause).wire())
            return fresh, write

        fresh.clear()
        recorded = run_hop(rt, self.request, key, crashed, side_effects=False, precheck=False)
    replayed = recorded is not fresh
    decision = Decision.parse(recorded)
    return _carry_out(self, rt, episode_id, decision, replayed)


def _carry_out(task, rt: Runtime, episode_id: str, decision: Decision, replayed: bool):
    """Send what a committed decision asks for; the task's return value for the chord."""
    if replayed and decision.next is not None:
        # Replayed decision: if its next hop is already claimed, another lineage of
        # this episode carries on; dropping this duplicate keeps the chord exact.
        with rt.session() as s:
            if ledger.exists(s, episode_id, decision.next.step, decision.next.hop):
                raise Ignore()
    if decision.park:
        # Waiting for room: the start message is parked in the episode's row and sent
        # again on admission; this delivery must not count as the chord member's end.
        task.request.chord = None
        return None
    if decision.final is not None:
        # The end is committed: give the slots back, and send the waiters they let in
        # (again on a replay: nothing to give back then, and their ledger drops doubles).
        try:
            admitted = admission.after_end(rt, episode_id, replay=replayed)
        except Exception:  # noqa: BLE001 - the episode has ended; its chord must still hear of it
            log.error("episode %s ended but its slots were not given back; the scheduler's repair "
                      "sweep will", episode_id, exc_info=True)
            admitted = []
        admission.send(task.app, admitted)
        tell_flower(task, decision.final)
        return decision.final.wire()
    return continue_with(task, next_signature(task.app, episode_id, decision.next, rt.refs(episode_id)[0]))


def tell_flower(task, final: Summary) -> None:
    """Send Flower a ``task-failed`` event for an episode that ended failed or infra_failed.

    The task itself returns normally: its chord must count the member as returned
    with its summary. Celery's event state lets the worker's ``task-succeeded`` win
    over any other event, so `megaflow flower` keeps a task failed when its failure
    came during its latest run (`megaflow.ops.flower`); its "Failed" count and the
    event's exception text show on any Flower. Best effort: never fails the task.
    """
    if final.state not in (states.FAILED, states.INFRA_FAILED):
        return
    try:
        task.send_event("task-failed", retry=False, traceback="",
                        exception=f"episode ended {final.state} ({final.exit_status or 'no exit status'})")
    except Exception:  # noqa: BLE001 - a lost event must not lose the episode's end
        log.warning("episode %s: Flower's task-failed event not sent", final.episode_id, exc_info=True)


class DecisionCrashed(Exception):
    """A scaffold or driver bug raised while deciding; carries the original as __cause__."""
