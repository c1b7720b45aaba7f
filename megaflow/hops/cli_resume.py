"""Waking a parked CLI agent's episode (`megaflow.agent.cli`): its program exited, its deadline passed, or its run was cancelled.

Apart from the proxy (`megaflow.hops.cli_proxy`) so that the client's `cancel` can
wake a run's parked episodes without loading the proxy's server.
"""

from __future__ import annotations

from sqlalchemy import func, insert, select, update

from megaflow.contract import HopResult
from megaflow.db import states
from megaflow.db.models import Episode, Step
from megaflow.hops.routing import label
from megaflow.sanitize import storable

_E, _S = Episode.__table__, Step.__table__

#: Why a program's episode was woken without its exit (the last step's action says it).
DEADLINE, CANCELLED = "the episode's deadline passed", "the run was cancelled"


def resume(rt, app, episode_id: str, exit_code: int | None, output: str = "", why: str = DEADLINE) -> bool:
    """Record the program's end as a last step and send the parked episode's decision.

    `rt`: anything with a ``session()`` (the runtime, a client). `exit_code` None: the
    program was not seen to exit, `why` says what woke the episode (its decision ends it
    ``time_limit`` or ``cancelled``, and its release destroys the sandbox, program and
    all). Only the first caller resumes (the exit report is retried; a deadline or a
    cancel may race it): False for the others.
    """
    with rt.session() as s:
        ep = s.execute(select(_E.c.state, _E.c.parked).where(_E.c.id == episode_id).with_for_update()).first()
        if ep is None or not (ep.parked or {}).get("cli"):
            return False
        index = s.execute(select(func.max(_S.c.index)).where(_S.c.episode_id == episode_id)).scalar() + 1
        what = "the agent program exited" if exit_code is not None else why
        s.execute(insert(_S).values(episode_id=episode_id, index=index, messages_in=[], action=f"({what})",
                                    observation=storable(output), exit_code=exit_code))
        s.execute(update(_E).where(_E.c.id == episode_id).values(parked=None, n_steps=index + 1))
        parked = ep.parked["task"] or {}
    prev = HopResult(hop="exec", step=index, exit_code=exit_code).wire()
    sig = app.signature("megaflow.episode", args=(prev, episode_id),
                        argsrepr=f"{label(None, episode_id, index)} after=program")
    if parked.get("id"):
        sig.freeze(parked["id"])
        sig.set(chord=parked.get("chord"), group_id=parked.get("group"), group_index=parked.get("group_index"),
                root_id=parked.get("root_id"))
    sig.apply_async()
    return True


def wake_cancelled(rt, app, run_id: str) -> int:
    """Wake a cancelled run's parked CLI episodes: each ends ``cancelled`` at once, its program killed.

    Call after the run's cancel is committed (the decision reads it). Returns how many were woken.
    """
    with rt.session() as s:
        rows = s.execute(select(_E.c.id, _E.c.parked).where(
            _E.c.run_id == run_id, _E.c.state == states.RUNNING, _E.c.parked.is_not(None))).all()
    return sum(resume(rt, app, eid, None, why=CANCELLED) for eid, parked in rows if (parked or {}).get("cli"))
