"""Read-only queries over the state database shared by progress, metrics and reports.

Every function takes an open session and never writes, so it can run against a
live cluster without touching the pipeline's transactions.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from megaflow.db import states
from megaflow.db.models import Episode, Hop, Run, SandboxRow, Step, TaskInstance, utcnow
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


def hop_histograms(session: Session, since: dt.datetime,
                   buckets: Sequence[float]) -> dict[str, tuple[list[int], int, float]]:
    """Per hop name, cumulative bucket counts of hops finished since `since`.

    The bucketing happens in SQL so a scrape reads one row per hop name, not one
    per hop, however busy the cluster is.

    Args:
        since: only hops finished at or after this time.
        buckets: upper bounds in seconds, ascending (``+Inf`` is implied).

    Returns:
        ``{hop: (cumulative counts per bucket, count, sum)}``.
    """
    value = Hop.duration_s
    per_bucket = [func.sum(case((value <= b, 1), else_=0)) for b in buckets]
    rows = session.execute(
        select(Hop.hop, func.count(), func.coalesce(func.sum(value), 0.0), *per_bucket)
        .where(Hop.finished_at >= since, value.is_not(None))
        .group_by(Hop.hop)
    ).all()
    return {r[0]: ([int(c or 0) for c in r[3:]], int(r[1]), float(r[2])) for r in rows}


def recent_tokens(session: Session, window_s: float) -> tuple[int, int]:
    """(prompt, completion) tokens of model calls that finished in the last `window_s` seconds.

    A step row is written before its model call, so the call's end is read from
    its ``generate`` hop in the ledger rather than from the step's timestamp.
    """
    since = utcnow() - dt.timedelta(seconds=window_s)
    row = session.execute(
        select(func.coalesce(func.sum(Step.prompt_tokens), 0), func.coalesce(func.sum(Step.completion_tokens), 0))
        .join(Hop, (Hop.subject_id == Step.episode_id) & (Hop.step_index == Step.index) & (Hop.hop == "generate"))
        .where(Hop.finished_at >= since)
    ).one()
    return int(row[0]), int(row[1])


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
    steps: int = 0

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
    for hop, duration in session.execute(select(Hop.hop, Hop.duration_s)
                                         .where(Hop.subject_id.in_(ids), Hop.duration_s.is_not(None))):
        data.hop_durations.setdefault(hop, []).append(duration)
    data.steps = int(session.execute(select(func.count()).select_from(Step).where(Step.episode_id.in_(ids)))
                     .scalar() or 0)
    return data
