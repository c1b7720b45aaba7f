"""Read-only queries over the state database shared by progress, metrics and reports.

Every function takes an open session and never writes, so it can run against a
live cluster without touching the pipeline's transactions.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from megaflow.db import states
from megaflow.db.models import Episode, Hop, Run, SandboxRow, Step, TaskInstance
from megaflow.db.run_stats import RunStats, run_stats, summarize

__all__ = ["RunStats", "run_stats", "summarize"]  # the one rule for run statistics, for operator tools too

#: Episode states that count as failures, and whose exit status says of what kind.
FAILED_STATES = (states.FAILED, states.INFRA_FAILED)

#: Display order of episode states: the state machine's order, terminal ones last.
STATE_ORDER = (states.PENDING, states.WAITING, states.PROVISIONING, states.RUNNING, states.EVALUATING,
               states.SUCCEEDED, states.FAILED, states.INFRA_FAILED, states.CANCELLED)


def failures_by_kind(session: Session, run_id: str) -> dict[str, int]:
    """Failed and infra-failed episodes of a run, counted by exit status (most frequent first).

    Current attempts only: one that `megaflow resume` re-ran is history, not a failure of the run.
    """
    rows = session.execute(
        select(func.coalesce(Episode.exit_status, "unknown"), func.count())
        .where(Episode.run_id == run_id, Episode.state.in_(FAILED_STATES), Episode.superseded_by.is_(None))
        .group_by(Episode.exit_status)
    ).all()
    return dict(sorted(rows, key=lambda r: (-r[1], r[0])))


def run_span_s(session: Session, run_id: str) -> float | None:
    """Seconds from the run's first episode created to its last episode finished (None before any ended)."""
    first, last = session.execute(select(func.min(Episode.created_at), func.max(Episode.finished_at))
                                  .where(Episode.run_id == run_id)).one()
    if first is None or last is None:
        return None
    return max(0.0, (last - first).total_seconds())


def episodes_by_state(session: Session, run_id: str | None = None) -> dict[str, int]:
    """Episodes counted by state: of one run, or of every run when `run_id` is None."""
    stmt = select(Episode.state, func.count()).group_by(Episode.state)
    if run_id is not None:
        stmt = stmt.where(Episode.run_id == run_id)
    return dict(session.execute(stmt).all())


def sandboxes_by_state(session: Session) -> dict[tuple[str, str], int]:
    """Sandbox rows counted by (host, state)."""
    rows = session.execute(select(SandboxRow.host, SandboxRow.state, func.count())
                           .group_by(SandboxRow.host, SandboxRow.state)).all()
    return {(host, state): n for host, state, n in rows}


def env_hosts(session: Session) -> list[str]:
    """Every env host that ever held a sandbox: each has an ``env.<host>`` queue."""
    return sorted(h for h in session.execute(select(SandboxRow.host).distinct()).scalars() if h)


def runs_by_status(session: Session) -> dict[str, int]:
    return dict(session.execute(select(Run.status, func.count()).group_by(Run.status)).all())


@dataclass
class EpisodeRow:
    """What a report needs of one episode."""

    instance_id: str
    state: str
    exit_status: str | None
    reward: float | None
    n_steps: int
    tokens: int
    created_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    #: Grading evidence (`megaflow.envs.grading.Evaluation.record`), None before evaluation.
    grading: dict | None = None


@dataclass
class RunData:
    """Everything a run report plots, read in a handful of queries."""

    run_id: str
    name: str
    status: str
    created_at: dt.datetime | None
    finished_at: dt.datetime | None
    summary: dict | None
    episodes: list[EpisodeRow] = field(default_factory=list)
    #: hop name -> work durations (s) of the run's hops.
    hop_durations: dict[str, list[float]] = field(default_factory=dict)
    #: hop name -> queue waits (s) of the run's hops (publish to start; hops recorded with one).
    hop_queued: dict[str, list[float]] = field(default_factory=dict)
    steps: int = 0
    #: `run_span_s`: the window of the run's "whole run" rates, as `megaflow status --watch` names it.
    span_s: float | None = None

    def stats(self) -> RunStats:
        """Counts by state, mean reward, solved: `summarize`, the rule every view shares."""
        return summarize((e.state, e.reward) for e in self.episodes)

    def by_state(self) -> dict[str, int]:
        counts = self.stats().by_state
        return {s: counts[s] for s in (*STATE_ORDER, *sorted(counts)) if s in counts}

    def failures(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for e in self.episodes:
            if e.state in FAILED_STATES:
                kind = e.exit_status or "unknown"
                counts[kind] = counts.get(kind, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def load_run(session: Session, run_id: str) -> RunData:
    """Read a run's current episodes (not the attempts `resume` replaced) and hop timings for a report.

    Raises:
        LookupError: no such run.
    """
    run = session.get(Run, run_id)
    if run is None:
        raise LookupError(f"no run {run_id}")
    data = RunData(run.id, run.name, run.status, run.created_at, run.finished_at, run.summary)
    rows = session.execute(
        select(TaskInstance.instance_id, Episode.state, Episode.exit_status, Episode.reward, Episode.n_steps,
               Episode.tokens, Episode.created_at, Episode.started_at, Episode.finished_at, Episode.grading)
        .join(TaskInstance, TaskInstance.id == Episode.task_instance_id)
        .where(Episode.run_id == run_id, Episode.superseded_by.is_(None)).order_by(Episode.seq)
    ).all()
    data.episodes = [EpisodeRow(*r) for r in rows]
    ids = select(Episode.id).where(Episode.run_id == run_id)
    for hop, duration, queued in session.execute(select(Hop.hop, Hop.duration_s, Hop.queued_s)
                                                 .where(Hop.subject_id.in_(ids), Hop.duration_s.is_not(None))):
        data.hop_durations.setdefault(hop, []).append(duration)
        if queued is not None:
            data.hop_queued.setdefault(hop, []).append(queued)
    data.steps = int(session.execute(select(func.count()).select_from(Step).where(Step.episode_id.in_(ids)))
                     .scalar() or 0)
    data.span_s = run_span_s(session, run_id)
    return data
