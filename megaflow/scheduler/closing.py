"""What a group's and a run's chord bodies write: statistics, advantages, the run's summary.

The bodies (``group.done``, ``run.done`` in `megaflow.hops.groups`) and the repair sweep
of jammed chords (`megaflow.scheduler.chords`) close a group or a run the same way,
so this lives below both.
"""

from __future__ import annotations

import math
from collections import Counter

from sqlalchemy import bindparam, func, select, update

from megaflow.db import states
from megaflow.db.models import Episode, RolloutGroup, Run, utcnow
from megaflow.db.run_stats import run_stats
from megaflow.db.sql import prepared
from megaflow.events import emit


def stale(s, run_id: str, generation: int) -> bool:
    """True when `megaflow resume` has started a newer generation of the run than `generation`."""
    current = s.execute(select(Run.generation).where(Run.id == run_id)).scalar()
    return current is not None and current > generation


def ready_channel(run_id: str) -> str:
    """The PostgreSQL channel on which a run's RL batch consumers wait (`megaflow.rl.handoff`)."""
    return f"megaflow_rl_{run_id}"


def notify_ready(s, run_id: str) -> None:
    """Wake the run's batch consumers: a group closed, or the run ended.

    PostgreSQL delivers a notification when, and only if, the transaction commits,
    so a consumer woken by it reads the rows written here. SQLite has no
    notifications; batches need PostgreSQL (`megaflow.rl.handoff` says so).
    """
    if s.get_bind().dialect.name == "postgresql":
        s.execute(select(func.pg_notify(ready_channel(run_id), "")))


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
    notify_ready(s, run_id)
    return {"group_id": group_id, **stats}


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
    notify_ready(s, run_id)
    return summary
