"""Group and run coordination by chords.

A run is ``chord([group.start(g) …], run.done)``; each ``group.start`` replaces
itself with ``chord([episode(e) …], group.done)``, so the group's callback takes
its place as a member of the run's chord.
"""

from __future__ import annotations

import math
import uuid
from collections import Counter

from celery import chord, group
from sqlalchemy import bindparam, select, true, update

from megaflow.db import states
from megaflow.db.models import Episode, RolloutGroup, Run, utcnow
from megaflow.db.run_stats import run_stats
from megaflow.db.sql import prepared
from megaflow.events import emit
from megaflow.hops.base import run_hop
from megaflow.runtime import get_runtime


def group_start_task(self, group_id: str, generation: int = 0):
    """Start a group's pending episodes as one chord; `generation` > 0 when `megaflow resume` sent it."""
    rt = get_runtime(self.app)
    with rt.session() as s:
        ids = s.execute(select(Episode.id).where(
            Episode.group_id == group_id, Episode.superseded_by.is_(None),
            Episode.state == states.PENDING if generation else true())
            .order_by(Episode.sample_index)).scalars().all()
    done = self.app.signature("megaflow.group.done", args=(group_id, generation) if generation else (group_id,))
    if not ids:
        # Resumed with nothing left to run: only the group's statistics are redone.
        return self.replace(done.clone(args=([],)))
    # Stable ids: a redelivered group.start sends the very same chord (same group id,
    # same member task ids), which the chord backend counts once — never a second
    # chord that would split the episodes' surviving lineages between two joins.
    header = group([self.app.signature("megaflow.episode", args=(None, eid), task_id=stable_id("episode", eid))
                    for eid in ids], task_id=stable_id("chord", group_id, generation))
    return self.replace(chord(header, done))


def stable_id(*parts) -> str:
    """A task or group id that is the same every time for the same parts."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "megaflow:" + ":".join(str(p) for p in parts)))


def stale(s, run_id: str, generation: int) -> bool:
    """True when `megaflow resume` has started a newer generation of the run than `generation`."""
    current = s.execute(select(Run.generation).where(Run.id == run_id)).scalar()
    return current is not None and current > generation


def group_stats(rewards: list[float]) -> dict:
    """Mean, std and GRPO-style advantages (r - mean) / (std + eps)."""
    if not rewards:
        return {"n": 0, "mean": None, "std": None, "advantages": []}
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    return {"n": len(rewards), "mean": mean, "std": std,
            "advantages": [(r - mean) / (std + 1e-6) for r in rewards]}


def _update_advantage(conn):
    e = Episode.__table__
    return update(e).where(e.c.id == bindparam("k_id")).values(
        advantage=bindparam("v_advantage", type_=e.c.advantage.type))


def close_group(s, group_id: str, generation: int = 0) -> dict:
    """Write a group's statistics and advantages (the group's chord body, or the repair sweep's).

    Returns:
        What ``group.done`` records in the ledger under ``(group_id, generation, "group.done")``.
    """
    run_id = s.execute(select(RolloutGroup.run_id).where(RolloutGroup.id == group_id)).scalar()
    if stale(s, run_id, generation):
        # A chord of a resumed run's earlier generation: the newer one does this.
        return {"group_id": group_id, "stale": True}
    rows = s.execute(select(Episode.id, Episode.state, Episode.reward)
                     .where(Episode.group_id == group_id, Episode.superseded_by.is_(None))
                     .order_by(Episode.sample_index)).all()
    # Infra failures are not the policy's doing: they get no reward and no advantage.
    scored = [(eid, r if r is not None else 0.0) for eid, st, r in rows if st in states.DONE]
    stats = group_stats([r for _, r in scored])
    if scored:
        conn = s.connection()
        conn.execute(prepared(conn, "group.advantage", _update_advantage),
                     [{"k_id": eid, "v_advantage": adv} for (eid, _), adv in zip(scored, stats["advantages"])])
    stats.pop("advantages")
    stats["states"] = dict(Counter(st for _, st, _ in rows))
    s.execute(update(RolloutGroup).where(RolloutGroup.id == group_id)
              .values(status="finished", stats=stats, finished_at=utcnow()))
    emit(s, "group.done", run_id, group_id, stats)
    return {"group_id": group_id, **stats}


def group_done_task(self, results, group_id: str, generation: int = 0):
    rt = get_runtime(self.app)

    def work(_ctx):
        def write(s):
            out.update(close_group(s, group_id, generation))
        out: dict = {}
        return out, write

    return run_hop(rt, self.request, (group_id, generation, "group.done"), work, side_effects=False,
                   precheck=False)


def run_summary(s, run_id: str) -> dict:
    """Counts and mean reward of the run's current episodes (`megaflow.db.run_stats`)."""
    return run_stats(s, run_id).summary()


def close_run(s, run_id: str, generation: int = 0) -> dict:
    """End a run with its summary (the run's chord body, or the repair sweep's).

    Returns:
        What ``run.done`` records in the ledger under ``(run_id, generation, "run.done")``.
    """
    if stale(s, run_id, generation):
        return {"run_id": run_id, "stale": True}
    summary = run_summary(s, run_id)
    cancelled = s.execute(select(Run.cancel_requested).where(Run.id == run_id)).scalar()
    s.execute(update(Run).where(Run.id == run_id).values(
        status="cancelled" if cancelled else "finished", summary=summary, finished_at=utcnow()))
    emit(s, "run.done", run_id, run_id, summary)
    return summary


def run_done_task(self, results, run_id: str, generation: int = 0):
    rt = get_runtime(self.app)

    def work(_ctx):
        def write(s):
            out.update(close_run(s, run_id, generation))
        out: dict = {}
        return out, write

    return run_hop(rt, self.request, (run_id, generation, "run.done"), work, side_effects=False, precheck=False)
