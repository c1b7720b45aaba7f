"""The episode state machine.

pending -> provisioning -> running -> evaluating -> succeeded | failed | infra_failed | cancelled

An episode that finds no free capacity (or is over its owner's quota) at its start
waits: pending -> waiting -> pending (admitted) -> provisioning (megaflow.scheduler).

Every change is a compare-and-set UPDATE, so two deliveries of the same hop can
never move an episode twice.
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import bindparam, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import identity_key
from sqlalchemy.sql.elements import ClauseElement

from megaflow.db.models import Episode, utcnow
from megaflow.db.sql import prepared

PENDING, PROVISIONING, RUNNING, EVALUATING = "pending", "provisioning", "running", "evaluating"
WAITING = "waiting"
SUCCEEDED, FAILED, INFRA_FAILED, CANCELLED = "succeeded", "failed", "infra_failed", "cancelled"

TERMINAL = frozenset({SUCCEEDED, FAILED, INFRA_FAILED, CANCELLED})
#: Terminal states that count as done for statistics and resume.
DONE = frozenset({SUCCEEDED, FAILED})


class ExitStatus(StrEnum):
    """Why an episode ended (``episodes.exit_status``); every value any module writes is here.

    A `StrEnum`: members are the strings stored and sent, so rows, JSON and
    comparisons with plain strings all agree.
    """

    #: The agent submitted; evaluation graded it (state ``succeeded``, any reward).
    SUBMITTED = "submitted"
    CANCELLED = "cancelled"
    # The agent's limits (state ``failed``, the run's no-submit penalty as reward).
    TIME_LIMIT = "time_limit"
    STEP_LIMIT = "step_limit"
    TOKEN_LIMIT = "token_limit"
    FORMAT_ERRORS = "format_errors"
    CONTEXT_LENGTH = "context_length"
    MODEL_ERROR = "model_error"
    # Infrastructure (state ``infra_failed``, no reward; `megaflow resume` runs it again).
    MODEL_UNAVAILABLE = "model_unavailable"
    PROVISION_FAILED = "provision_failed"
    SETUP_FAILED = "setup_failed"
    SANDBOX_LOST = "sandbox_lost"
    REBUILD_FAILED = "rebuild_failed"
    EXEC_INTERRUPTED = "exec_interrupted"
    EVALUATION_FAILED = "evaluation_failed"
    #: A message delivered more often than ``hop_max_deliveries`` without finishing.
    POISON = "poison"
    #: A chord member (one hop's task) failed outside every handler.
    HOP_CRASHED = "hop_crashed"
    #: The decision itself raised (a scaffold or driver bug).
    AGENT_CRASHED = "agent_crashed"
    #: A hop's work raised something unforeseen (`megaflow.hops.base.guarded`).
    PROVISION_CRASHED = "provision_crashed"
    GENERATE_CRASHED = "generate_crashed"
    EXEC_CRASHED = "exec_crashed"
    EVALUATE_CRASHED = "evaluate_crashed"
    RELEASE_CRASHED = "release_crashed"
    #: The run was stopped with the episode in flight and then resumed (`megaflow resume`).
    INTERRUPTED = "interrupted"

    @classmethod
    def crashed(cls, hop: str) -> ExitStatus:
        """The status of hop `hop` crashing (`HOP_CRASHED` for a name with none of its own)."""
        try:
            return cls(f"{hop}_crashed")
        except ValueError:
            return cls.HOP_CRASHED

TRANSITIONS: dict[str, frozenset[str]] = {
    PENDING: frozenset({WAITING, PROVISIONING, CANCELLED, INFRA_FAILED, FAILED}),
    WAITING: frozenset({PENDING, CANCELLED, INFRA_FAILED}),
    PROVISIONING: frozenset({RUNNING, INFRA_FAILED, FAILED, CANCELLED}),
    RUNNING: frozenset({EVALUATING, FAILED, INFRA_FAILED, CANCELLED}),
    EVALUATING: frozenset({SUCCEEDED, FAILED, INFRA_FAILED, CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    INFRA_FAILED: frozenset(),
    CANCELLED: frozenset(),
}


class InvalidTransition(ValueError):
    """The requested move is not an edge of the state machine."""


def can_move(src: str, dst: str) -> bool:
    return dst in TRANSITIONS.get(src, frozenset())


def sources_of(dst: str) -> frozenset[str]:
    return frozenset(s for s, dsts in TRANSITIONS.items() if dst in dsts)


def move(session: Session, episode_id: str, dst: str, **values) -> bool:
    """Move an episode to `dst` if its current state allows it.

    Returns:
        True if this call made the move; False if the episode was elsewhere
        (already moved by another delivery, or terminal).

    Raises:
        InvalidTransition: `dst` is not a state.
    """
    if dst not in TRANSITIONS:
        raise InvalidTransition(f"unknown state {dst!r}")
    if dst in TERMINAL:
        values.setdefault("finished_at", utcnow())
    if dst == RUNNING:
        values.setdefault("started_at", utcnow())
    if any(isinstance(v, ClauseElement) for v in values.values()):
        stmt = (
            update(Episode)
            .where(Episode.id == episode_id, Episode.state.in_(sources_of(dst)))
            .values(state=dst, **values)
        )
        return session.execute(stmt).rowcount == 1
    # The common case, on every decision: a statement prepared per (state, columns),
    # run on the session's connection (no ORM statement processing).
    session.flush()
    conn = session.connection()
    cols = sorted(values)
    stmt = prepared(conn, f"states.move:{dst}:{','.join(cols)}", lambda c: _move_statement(dst, cols))
    moved = conn.execute(stmt, {"k_id": episode_id, "v_state": dst, **{f"v_{k}": v for k, v in values.items()}}
                         ).rowcount == 1
    if moved:
        # As an ORM update would: an Episode loaded in this session must not show the old state.
        loaded = session.identity_map.get(identity_key(Episode, episode_id))
        if loaded is not None:
            session.expire(loaded)
    return moved


def _move_statement(dst: str, cols: list[str]):
    t = Episode.__table__
    return (update(t).where(t.c.id == bindparam("k_id"), t.c.state.in_(sorted(sources_of(dst))))
            .values({c: bindparam(f"v_{c}", type_=t.c[c].type) for c in ["state", *cols]}))
