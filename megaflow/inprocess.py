"""Run episodes in this process, without a broker or workers: for unit tests and for debugging a scaffold.

The real pieces, minus the transport: the `Driver` decides on the real rows
(`SqlRows`, SQLite or PostgreSQL), and each hop is the real Celery task body run
here through Celery's `Task.apply` (the ledger, sandboxes, model clients and
grading all as in a worker). What is left out is what only a broker does: nothing
is queued, no chord closes (the group callbacks are not run), and a hop's retries
run at once instead of after their countdown.

    runner = InProcessRunner(Settings(database_url="sqlite:///x.db"))
    summaries = runner.run(spec)          # one Summary per episode, in order
"""

from __future__ import annotations

from sqlalchemy import select

from megaflow.app import make_app
from megaflow.client import Client, as_spec
from megaflow.config import Settings
from megaflow.contract import Decision, HopResult, Summary
from megaflow.db.models import Episode
from megaflow.db.schema import upgrade
from megaflow.hops.episode import driver_for
from megaflow.hops.routing import HOP_TASKS
from megaflow.runtime import get_runtime
from megaflow.scheduler import admission, hosts
from megaflow.spec import RunSpec

#: Hops one episode may take before the runner calls it stuck (a Driver bug, not an agent's doing).
MAX_HOPS = 10_000


class Stuck(RuntimeError):
    """An episode went on past `MAX_HOPS` hops, or parked with nothing to admit it."""


class InProcessRunner:
    """Drives episodes to their end one after another, hop by hop, in this process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        upgrade(settings.resolved_database_url())
        self.app = make_app(settings)
        self.client = Client(settings, app=self.app)
        self.rt = get_runtime(self.app)
        #: Every decision taken, in order: (episode id, the hop it followed, the decision).
        self.trace: list[tuple[str, HopResult, Decision]] = []

    def run(self, spec: RunSpec | dict) -> list[Summary]:
        """Record a run of `spec` and drive each of its episodes to its end."""
        run_id, _groups = self.client._record(as_spec(spec))
        with self.rt.session(readonly=True) as s:
            ids = s.execute(select(Episode.id).where(Episode.run_id == run_id).order_by(Episode.seq)).scalars().all()
        return [self.run_episode(eid) for eid in ids]

    def run_episode(self, episode_id: str, prev: HopResult | None = None) -> Summary:
        """Decide, run the hop decided, decide again … until the episode ends; its summary."""
        prev = prev or HopResult(hop="start")
        for _ in range(MAX_HOPS):
            decision = self.decide(episode_id, prev)
            if decision.final is not None:
                admission.after_end(self.rt, episode_id)
                return decision.final
            if decision.park:
                raise Stuck(f"episode {episode_id} parked to wait for room; nothing admits it in-process")
            prev = self.hop(episode_id, decision)
        raise Stuck(f"episode {episode_id} took {MAX_HOPS} hops without ending")

    def decide(self, episode_id: str, prev: HopResult) -> Decision:
        """One decision in its own transaction, as the episode task takes it (without the ledger record).

        A decision that raises (a scaffold bug) ends the episode ``agent_crashed`` in
        a transaction of its own, as the episode task does.
        """
        self.rt.warm(episode_id)
        if prev.hop == "start":
            with self.rt.session() as s:
                # This process is the env host its episodes are placed on (a beat per start keeps it live).
                hosts.register(s, self.settings.host, self.settings.sandbox_capacity)
        try:
            with self.rt.session() as s:
                driver = driver_for(self.rt, s, episode_id, parking={})
                decision = driver.decide(prev)
                driver.rows.save()
        except Exception as exc:  # noqa: BLE001 - contained as the episode task contains it
            with self.rt.session() as s:
                driver = driver_for(self.rt, s, episode_id)
                decision = driver.crashed(prev.step, exc)
                driver.rows.save()
        self.trace.append((episode_id, prev, decision))
        return decision

    def hop(self, episode_id: str, decision: Decision) -> HopResult:
        """Run the decided hop's task body here; what it returned."""
        task = self.app.tasks[HOP_TASKS[decision.next.hop]]
        outcome = task.apply(args=(episode_id, decision.next.step), throw=True)
        return HopResult.received(outcome.get(disable_sync_subtasks=False))
