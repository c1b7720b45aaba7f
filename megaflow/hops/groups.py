"""Group and run coordination by chords.

A run is ``chord([group.start(g) …], run.done)``; each ``group.start`` replaces
itself with ``chord([episode(e) …], group.done)``, so the group's callback takes
its place as a member of the run's chord.
"""

from __future__ import annotations

import uuid

from celery import chord, group
from sqlalchemy import select, true

from megaflow.db import states
from megaflow.db.models import Episode
from megaflow.hops.base import run_hop
from megaflow.hops.routing import label
from megaflow.runtime import get_runtime
from megaflow.scheduler.closing import close_group, close_run


def group_start_task(self, group_id: str, generation: int = 0):
    """Start a group's pending episodes as one chord; `generation` > 0 when `megaflow resume` sent it."""
    rt = get_runtime(self.app)
    with rt.session() as s:
        rows = s.execute(select(Episode.id, Episode.run_id).where(
            Episode.group_id == group_id, Episode.superseded_by.is_(None),
            Episode.state == states.PENDING if generation else true())
            .order_by(Episode.sample_index)).all()
    done = self.app.signature("megaflow.group.done", args=(group_id, generation) if generation else (group_id,))
    if not rows:
        # Resumed with nothing left to run: only the group's statistics are redone.
        return self.replace(done.clone(args=([],)))
    # Stable ids: a redelivered group.start sends the very same chord (same group id,
    # same member task ids), which the chord backend counts once — never a second
    # chord that would split the episodes' surviving lineages between two joins.
    header = group([self.app.signature("megaflow.episode", args=(None, eid), task_id=stable_id("episode", eid),
                                       argsrepr=label(run_id, eid, 0, "start"))
                    for eid, run_id in rows], task_id=stable_id("chord", group_id, generation))
    return self.replace(chord(header, done))


def stable_id(*parts) -> str:
    """A task or group id that is the same every time for the same parts."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "megaflow:" + ":".join(str(p) for p in parts)))


def group_done_task(self, results, group_id: str, generation: int = 0):
    rt = get_runtime(self.app)

    def work(_ctx):
        def write(s):
            out.update(close_group(s, group_id, generation))
        out: dict = {}
        return out, write

    return run_hop(rt, self.request, (group_id, generation, "group.done"), work, side_effects=False,
                   precheck=False)


def run_done_task(self, results, run_id: str, generation: int = 0):
    rt = get_runtime(self.app)

    def work(_ctx):
        def write(s):
            out.update(close_run(s, run_id, generation))
        out: dict = {}
        return out, write

    return run_hop(rt, self.request, (run_id, generation, "run.done"), work, side_effects=False, precheck=False)
