"""A run's statistics, by one rule: counts by state, mean reward, episodes solved.

The run's summary (``run.done``), `Client.status`, `megaflow status` and the HTML
report all read them from here, so they agree. It lives with the tables, below the
hops that write the summary; `megaflow.ops.stats` offers it to operator tools too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from megaflow.db import states
from megaflow.db.models import Episode

#: A reward at or above this solves the task (an episode that succeeded with it).
SOLVED_REWARD = 1.0


@dataclass(frozen=True)
class RunStats:
    """Statistics of a run's current episodes (not the attempts `megaflow resume` replaced)."""

    #: Current episodes, whatever their state.
    episodes: int
    #: Current episodes counted by state.
    by_state: dict[str, int]
    #: The rewards the mean counts: one per finished episode (see `summarize`).
    rewards: tuple[float, ...]
    #: Episodes that succeeded with a reward of at least `SOLVED_REWARD`.
    solved: int

    @property
    def mean_reward(self) -> float | None:
        """Mean of `rewards`; None while no episode has finished."""
        return sum(self.rewards) / len(self.rewards) if self.rewards else None

    def summary(self) -> dict:
        """The run's summary as ``run.done`` records it (``Run.summary``)."""
        return {"episodes": self.episodes, "by_state": dict(self.by_state), "mean_reward": self.mean_reward,
                "solved": self.solved}


def summarize(rows: Iterable[tuple[str, float | None]]) -> RunStats:
    """Statistics of episodes given as ``(state, reward)`` pairs: the one rule for a missing reward.

    The mean reward is over the episodes that finished, ``succeeded`` or ``failed``:
    what the agent earned. One that finished without a reward counts 0.0 (it earned
    nothing). Infra-failed episodes carry no reward and are not counted in the mean
    (the infrastructure ended them, not the agent; `megaflow resume` re-runs them),
    nor are cancelled episodes or those still under way.

    Args:
        rows: one ``(state, reward)`` per current episode.
    """
    rows = list(rows)
    finished = tuple(0.0 if reward is None else float(reward) for state, reward in rows if state in states.DONE)
    solved = sum(1 for state, reward in rows if state == states.SUCCEEDED and (reward or 0.0) >= SOLVED_REWARD)
    return RunStats(episodes=len(rows), by_state=dict(Counter(state for state, _ in rows)), rewards=finished,
                    solved=solved)


def run_stats(session: Session, run_id: str) -> RunStats:
    """`summarize` over the run's current episodes, read in one query."""
    rows = session.execute(select(Episode.state, Episode.reward).where(
        Episode.run_id == run_id, Episode.superseded_by.is_(None))).all()
    return summarize((state, reward) for state, reward in rows)
