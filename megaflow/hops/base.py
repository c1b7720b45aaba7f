"""One idempotent way to run any hop: claim, work, record — or replay what was recorded."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery.exceptions import Ignore, Retry
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from megaflow.contract import failure
from megaflow.db import ledger
from megaflow.db.states import ExitStatus
from megaflow.hops.queue_wait import queue_wait
from megaflow.runtime import Runtime

log = logging.getLogger(__name__)

#: work(ctx) does the hop's outside effects (model call, command) and returns its
#: result and a function that writes the hop's rows inside the recording transaction.
Work = Callable[[Any], tuple[dict, Callable[[Session], None] | None]]
#: load(session) reads what the work needs, in the claim's (or pre-check's) transaction.
Load = Callable[[Session], Any]


def run_hop(rt: Runtime, request, key: tuple[str, int, str], work: Work, side_effects: bool = True,
            precheck: bool = True, load: Load | None = None) -> dict:
    """Run a hop exactly once in effect.

    Hops with side effects outside the database (a command in a sandbox) claim the
    ledger row first, so a duplicate never runs the command twice while the first
    is alive. Hops without (a decision, a model call) skip the claim: they run,
    then record in one transaction; a racing duplicate's transaction is rolled
    back and it replays the recorded result. That saves a write per hop. With
    `precheck`, a duplicate is spotted before the work (worth a read when the
    work is costly, like a model call). `load` shares that first transaction,
    so a hop costs two round trips to the database, not four.

    Returns:
        The hop's result: freshly computed, or as recorded by an earlier delivery.

    Raises:
        Ignore: another message holds this hop (a duplicate lineage); drop this one.
        ledger.ClaimLost: the claim was taken from this delivery (host recovery) before it recorded.
    """
    # Read before any work so the wait ends where the hop starts (recorded with its result).
    queued = queue_wait(request)
    if not side_effects:
        return _run_optimistic(rt, request, key, work, precheck, load, queued)
    ctx = None
    with rt.session() as s:
        c = ledger.claim(s, *key, request.id)
        if c.status == ledger.NEW and load is not None:
            ctx = load(s)
    if c.status == ledger.DONE:
        log.info("hop %s already recorded; replaying its result", key)
        return c.result
    if c.status == ledger.BUSY:
        log.info("hop %s held by another delivery; dropping this one", key)
        raise Ignore()
    t0 = time.monotonic()
    # No delivery limit here: `megaflow.delivery.MegaFlowTask` counts deliveries (the
    # `deliveries` table, the one count) and stops a poison hop before it gets this far.
    result, write = guarded(work, ctx, key)
    with rt.session() as s:
        # Mark done first: if another delivery got there, nothing of ours is written.
        if not ledger.finish(s, *key, result, time.monotonic() - t0, task_id=request.id, queued_s=queued):
            s.rollback()
            recorded = ledger.recorded(s, *key)
            if recorded is None:
                # Our claim was orphaned (our env host was declared dead): not ours to record.
                raise ledger.ClaimLost(key)
            return recorded
        if write is not None:
            write(s)
    return result


def _run_optimistic(rt: Runtime, request, key: tuple[str, int, str], work: Work, precheck: bool,
                    load: Load | None, queued: float | None = None) -> dict:
    ctx = None
    if precheck or load is not None:
        # Reads only (the work's outside effects come after): no transaction needed.
        with rt.session(readonly=True) as s:
            done = ledger.recorded(s, *key) if precheck else None
            if done is not None:
                return done
            ctx = load(s) if load is not None else None
    t0 = time.monotonic()
    result, write = guarded(work, ctx, key)
    with rt.session() as s:
        # The writes go first and the ledger row last, with the result as the writes
        # left it (a decision's is filled in by them): one statement for the ledger.
        # A replayed hop's writes either collide with the first delivery's rows
        # (IntegrityError) or its ledger insert finds the row: either way the whole
        # transaction is rolled back and the recorded result replayed.
        try:
            if write is not None:
                write(s)
        except IntegrityError:
            s.rollback()
            done = ledger.recorded(s, *key)
            if done is None:
                raise
            return done
        if not ledger.record(s, *key, request.id, result, time.monotonic() - t0, queued_s=queued):
            s.rollback()
            return ledger.recorded(s, *key) or result
    return result


def guarded(work: Work, ctx, key: tuple[str, int, str]):
    """Run `work`; an unexpected exception becomes a recorded infra failure of the hop.

    Without this, a bug or an unforeseen error in a backend would fail the Celery
    task, stop the episode's chain and leave the episode running forever.
    Retries, drops and lost database connections still propagate.
    """
    try:
        return work(ctx)
    except (Retry, Ignore, OperationalError, InterfaceError):
        raise
    except Exception as exc:
        log.exception("hop %s crashed", key)
        return failure(key[2], key[1], exc, ExitStatus.crashed(key[2])).wire(), None
