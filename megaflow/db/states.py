"""The episode state machine.

pending -> provisioning -> running -> evaluating -> succeeded | failed | infra_failed | cancelled

An episode that finds no free capacity (or is over its owner's quota) at its start
waits: pending -> waiting -> pending (admitted) -> provisioning (megaflow.scheduler).

Every change is a compare-and-set UPDATE, so two deliveries of the same hop can
never move an episode twice.
"""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from megaflow.db.models import Episode, utcnow

PENDING, PROVISIONING, RUNNING, EVALUATING = "pending", "provisioning", "running", "evaluating"
WAITING = "waiting"
SUCCEEDED, FAILED, INFRA_FAILED, CANCELLED = "succeeded", "failed", "infra_failed", "cancelled"

TERMINAL = frozenset({SUCCEEDED, FAILED, INFRA_FAILED, CANCELLED})
#: Terminal states that count as done for statistics and resume.
DONE = frozenset({SUCCEEDED, FAILED})

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
    stmt = (
        update(Episode)
        .where(Episode.id == episode_id, Episode.state.in_(sources_of(dst)))
        .values(state=dst, **values)
    )
    return session.execute(stmt).rowcount == 1
