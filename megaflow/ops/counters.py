"""Cumulative counts since the beginning of the state database, kept incrementally for the exporter.

Prometheus counters and histograms must only grow. They are computed from the
rows the workers already write (hops, episodes, steps), never counted in the
workers. To keep a scrape cheap on a big ``hops`` table, rows are folded into
running totals once and a high-water mark (a ``finished_at`` time) remembers
how far: each scrape aggregates only rows finished after the mark.

Rows are stamped by the worker that writes them and committed a moment later,
so a row can appear *behind* a mark that has already passed it. The mark
therefore trails the scrape's clock by `settle_s`: rows newer than the mark are
aggregated afresh on every scrape and added on top (so a value is current, not
`settle_s` late), and are folded into the totals only once they are older than
`settle_s`. A row that commits more than `settle_s` after its ``finished_at``
(clock skew between a worker and the exporter beyond that) is never counted.

Label values are bounded: a hop name, state or exit status the code does not
know becomes ``other``; no free text (error messages, wait reasons) is a label.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import get_args

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from megaflow.contract import HopName
from megaflow.db import states
from megaflow.db.models import Episode, Hop, Step, utcnow
from megaflow.db.states import ExitStatus

OTHER = "other"
#: Every hop name the ledger holds: the services' hops, the episode's decisions, the chords' bodies.
HOP_NAMES = frozenset({"provision", "generate", "exec", "evaluate", "release", "group.done", "run.done",
                       *(f"agent.{h}" for h in get_args(HopName))})
#: A hop's outcome, from its recorded result: a failure's kind, or ok.
OUTCOMES = ("ok", "agent_error", "infra_error")
STATES = frozenset({states.PENDING, states.WAITING, states.PROVISIONING, states.RUNNING, states.EVALUATING,
                    *states.TERMINAL})
EXIT_STATUSES = frozenset(e.value for e in ExitStatus)
#: An episode that ended without an exit status (older rows).
NONE = "none"


def bounded(value: str | None, known: frozenset[str] | Sequence[str], missing: str = OTHER) -> str:
    """`value` if the code knows it, `missing` if empty, else ``other``: a label never carries free text."""
    if not value:
        return missing
    return value if value in known else OTHER


@dataclass
class Histogram:
    """Cumulative bucket counts (one per upper bound, ``+Inf`` implied by `count`), count and sum."""

    buckets: list[int]
    count: int = 0
    total: float = 0.0

    def add(self, other: Histogram) -> None:
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets)]
        self.count += other.count
        self.total += other.total


@dataclass
class Totals:
    """What the exporter serves as counters and histograms."""

    hops: Counter = field(default_factory=Counter)  # (hop, outcome) -> hops finished
    work: dict[str, Histogram] = field(default_factory=dict)  # hop -> work time (duration_s)
    queued: dict[str, Histogram] = field(default_factory=dict)  # hop -> queue wait (queued_s)
    episodes: Counter = field(default_factory=Counter)  # (state, exit status) -> episodes ended
    tokens: Counter = field(default_factory=Counter)  # prompt | completion -> tokens of finished model calls

    def add(self, other: Totals) -> None:
        self.hops.update(other.hops)
        self.episodes.update(other.episodes)
        self.tokens.update(other.tokens)
        for mine, theirs in ((self.work, other.work), (self.queued, other.queued)):
            for hop, h in theirs.items():
                _merge(mine, hop, h)

    def plus(self, other: Totals) -> Totals:
        out = Totals()
        out.add(self)
        out.add(other)
        return out


class Cumulative:
    """Running totals of the state database, advanced on each `read`.

    Args:
        buckets: histogram upper bounds in seconds, ascending.
        settle_s: how far the high-water mark trails the clock (see the module doc).
    """

    def __init__(self, buckets: Sequence[float], settle_s: float = 30.0):
        self.buckets = list(buckets)
        self.settle_s = settle_s
        self.settled = Totals()
        #: Rows finished at or before this time are in `settled`; None before the first read.
        self.mark: dt.datetime | None = None
        # The exporter's HTTP server answers scrapes on threads: two folding the same rows would count them twice.
        self._lock = threading.Lock()

    def read(self, session: Session, now: dt.datetime | None = None) -> Totals:
        """Totals over every row finished so far (since the beginning of the database)."""
        cut = (now or utcnow()) - dt.timedelta(seconds=self.settle_s)
        with self._lock:
            if self.mark is None or cut > self.mark:  # a clock stepped back leaves the mark where it is
                self.settled.add(self._rows(session, self.mark, cut))
                self.mark = cut
            return self.settled.plus(self._rows(session, self.mark, None))

    def _rows(self, s: Session, after: dt.datetime | None, upto: dt.datetime | None) -> Totals:
        out = Totals()
        self._hops(s, _window(Hop.finished_at, after, upto), out)
        for state, exit_status, n in s.execute(
                select(Episode.state, Episode.exit_status, func.count())
                .where(*_window(Episode.finished_at, after, upto)).group_by(Episode.state, Episode.exit_status)):
            out.episodes[(bounded(state, STATES), bounded(exit_status, EXIT_STATUSES, NONE))] += n
        prompt, completion = s.execute(
            select(func.coalesce(func.sum(Step.prompt_tokens), 0), func.coalesce(func.sum(Step.completion_tokens), 0))
            .join(Hop, (Hop.subject_id == Step.episode_id) & (Hop.step_index == Step.index) & (Hop.hop == "generate"))
            .where(*_window(Hop.finished_at, after, upto))).one()
        out.tokens.update({"prompt": int(prompt), "completion": int(completion)})
        return out

    def _hops(self, s: Session, where, out: Totals) -> None:
        # Bucketing happens in SQL: a scrape reads one row per (hop, outcome), not one per hop.
        # The outcome is computed in a subquery so that both dialects can group by it.
        kind = Hop.result["kind"].as_string()
        outcome = case((kind == "infra", "infra_error"), (kind == "agent", "agent_error"), else_="ok")
        rows = select(Hop.hop, outcome.label("outcome"), Hop.duration_s, Hop.queued_s).where(*where).subquery()
        cols = [func.count()]
        for value in (rows.c.duration_s, rows.c.queued_s):
            cols += [func.count(value), func.coalesce(func.sum(value), 0.0),
                     *(func.sum(case((value <= b, 1), else_=0)) for b in self.buckets)]
        width = 2 + len(self.buckets)
        for hop, outcome_, n, *rest in s.execute(select(rows.c.hop, rows.c.outcome, *cols)
                                                 .group_by(rows.c.hop, rows.c.outcome)):
            hop = bounded(hop, HOP_NAMES)
            out.hops[(hop, bounded(outcome_, OUTCOMES))] += n
            for target, part in ((out.work, rest[:width]), (out.queued, rest[width:])):
                _merge(target, hop, Histogram([int(c or 0) for c in part[2:]], int(part[0]), float(part[1] or 0.0)))


def _merge(into: dict[str, Histogram], hop: str, h: Histogram) -> None:
    """Add `h` to `into[hop]` (a copy of it when there is none: `h` may be another total's)."""
    if hop in into:
        into[hop].add(h)
    else:
        into[hop] = Histogram(list(h.buckets), h.count, h.total)


def _window(column, after: dt.datetime | None, upto: dt.datetime | None) -> list:
    where = [column.is_not(None)]
    if after is not None:
        where.append(column > after)
    if upto is not None:
        where.append(column <= upto)
    return where
