"""The rows one decision reads and writes, behind a small interface (`EpisodeRows`).

The `Driver` decides from these and nothing else; `SqlRows` is their one
implementation, on the decision's own transaction (PostgreSQL or SQLite). Core
statements, prepared once per connection: a decision is the agent pool's whole
job, so it costs two round trips for the common step, not an ORM flush.
"""

from __future__ import annotations

from typing import Any, Protocol

from sqlalchemy import bindparam, insert, select
from sqlalchemy.orm import Session

from megaflow.db import ledger, states
from megaflow.db.models import Episode, Run, Step
from megaflow.db.sql import Tracked, prepared, update_where
from megaflow.events import emit
from megaflow.model.base import Message
from megaflow.scheduler import admission


class EpisodeRows(Protocol):
    """What a decision may read and change of its episode.

    Attributes:
        ep: The episode's columns; those the decision sets are written by `save`.
        cancel_requested: Whether the episode's run was asked to stop.
    """

    ep: Tracked
    cancel_requested: bool

    def step(self, index: int) -> Tracked:
        """The columns of step `index` a decision reads; set ones are written by `save`."""

    def new_step(self, index: int, messages: list[Message]) -> None:
        """Add step `index` with the messages the model will be sent."""

    def move(self, state: str, event: dict | None = None, **values: Any) -> bool:
        """Compare-and-set the episode to `state` with `values`; True if this call moved it.

        With `event`, an ``episode.ended`` event carrying it is appended when it moved.
        """

    def hop_recorded(self, step: int, hop: str) -> bool:
        """Whether the ledger holds hop `hop` of step `step` for this episode."""

    def admit(self, parking: dict) -> tuple[bool, str | None]:
        """Admit the episode now (True, its env host), or park it with `parking` to be sent again."""

    def save(self) -> None:
        """Write what was set on the episode and on the steps read."""

    def reload(self) -> None:
        """`save`, then read the episode again (after a move)."""


class SqlRows:
    """`EpisodeRows` on a SQLAlchemy session (the decision's transaction)."""

    def __init__(self, session: Session, episode_id: str, settings=None, claim=None):
        self.s = session
        self._settings, self._claim = settings, claim
        conn = session.connection()
        # The run's cancel flag comes in the same query: one round trip, not two.
        row = conn.execute(prepared(conn, "driver.episode", _select_episode), {"k_id": episode_id}).first()
        if row is None:
            raise LookupError(f"episode {episode_id} not found")
        values = dict(row._mapping)
        self.cancel_requested = values.pop("cancel_requested")
        self.ep = Tracked(values)
        self._steps: list[Tracked] = []

    def step(self, index: int) -> Tracked:
        conn = self.s.connection()
        row = conn.execute(prepared(conn, "driver.step", _select_step),
                           {"k_episode_id": self.ep.id, "k_index": index}).one()
        self._steps.append(Tracked(row._mapping))
        return self._steps[-1]

    def new_step(self, index: int, messages: list[Message]) -> None:
        insert_step(self.s.connection(), self.ep.id, index, messages)

    def move(self, state: str, event: dict | None = None, **values: Any) -> bool:
        moved = states.move(self.s, self.ep.id, state, **values)
        if moved and event is not None:
            emit(self.s, "episode.ended", self.ep.run_id, self.ep.id, event)
        return moved

    def hop_recorded(self, step: int, hop: str) -> bool:
        return ledger.exists(self.s, self.ep.id, step, hop)

    def admit(self, parking: dict) -> tuple[bool, str | None]:
        return admission.start(self.s, self._settings, self.ep, self._claim(self.ep), parking)

    def save(self) -> None:
        if self.ep.changes:
            update_where(self.s.connection(), _EPISODES, {"id": self.ep.id}, self.ep.changes)
            self.ep.changes.clear()
        for row in self._steps:
            if row.changes:
                update_where(self.s.connection(), _STEPS, {"episode_id": self.ep.id, "index": row.index},
                             row.changes)
                row.changes.clear()

    def reload(self) -> None:
        self.save()
        conn = self.s.connection()
        row = conn.execute(prepared(conn, "driver.reload", lambda c: select(_EPISODES).where(
            _EPISODES.c.id == bindparam("k_id"))), {"k_id": self.ep.id}).one()
        self.ep = Tracked(row._mapping)


_EPISODES, _RUNS, _STEPS = Episode.__table__, Run.__table__, Step.__table__


def insert_step(conn, episode_id: str, index: int, messages: list[Message], **values: Any) -> None:
    """Add step `index` of an episode with the messages the model will be sent (and any other columns)."""
    row = {"episode_id": episode_id, "index": index, "messages_in": [m.wire() for m in messages]}
    conn.execute(prepared(conn, "driver.new_step", lambda c: insert(_STEPS)), {**row, **values})


def _select_episode(conn):
    return (select(_EPISODES, _RUNS.c.cancel_requested).join(_RUNS, _RUNS.c.id == _EPISODES.c.run_id)
            .where(_EPISODES.c.id == bindparam("k_id")))


def _select_step(conn):
    c = _STEPS.c
    return select(c.index, c.completion, c.tool_calls, c.action, c.observation, c.exit_code, c.agent_s).where(
        c.episode_id == bindparam("k_episode_id"), c.index == bindparam("k_index"))
