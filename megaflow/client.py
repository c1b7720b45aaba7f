"""The Python API: ``Client(...).submit(spec)``, ``wait``, ``status``, ``cancel``, ``results``, ``export``, ``batches``."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from celery import chord
from sqlalchemy import func, select, update

from megaflow.app import make_app
from megaflow.config import Settings
from megaflow.db import states
from megaflow.db.engine import session_scope
from megaflow.db.listen import Listener
from megaflow.db.models import Episode, Event, RolloutGroup, Run, Step, TaskInstance, new_id
from megaflow.db.run_stats import run_stats
from megaflow.db.states import ExitStatus
from megaflow.deadlines import check_spec as check_deadlines
from megaflow.errors import SpecError
from megaflow.events import emit
from megaflow.scheduler import admission
from megaflow.scheduler.chords import chord_unclosed
from megaflow.scheduler.closing import ready_channel
from megaflow.spec import RunSpec


class Client:
    """Submit and follow runs. Holds a Celery app for publishing and a DB URL."""

    def __init__(self, settings: Settings | None = None, app=None):
        self.settings = settings or Settings()
        self.app = app or make_app(self.settings)
        self.db_url = self.settings.resolved_database_url()

    def session(self):
        return session_scope(self.db_url)

    # -- submitting ---------------------------------------------------------------

    def submit(self, spec: RunSpec | dict | str | Path) -> str:
        """Validate, record and enqueue a run. Returns its id.

        Raises:
            SpecError: the spec is invalid; nothing was recorded or queued.
        """
        spec = as_spec(spec)
        check_deadlines(spec, self.settings)
        run_id, group_ids = self._record(spec)
        self.publish(run_id, group_ids)
        return run_id

    def _record(self, spec: RunSpec) -> tuple[str, list[str]]:
        with self.session() as s:
            run = Run(id=new_id(), name=spec.name, user=spec.user, project=spec.project,
                      spec=spec.model_dump(mode="json"), n_episodes=spec.n_episodes)
            s.add(run)
            s.flush()
            # Submission order across runs: FIFO admission follows `seq`.
            seq = int(s.execute(select(func.max(Episode.seq))).scalar() or 0) + 1
            seq = max(seq, time.time_ns() // 1000)
            instances, groups, episodes = [], [], []
            for t_index, task in enumerate(spec.tasks):
                ti = TaskInstance(id=new_id(), run_id=run.id, instance_id=task.instance_id, kind=task.kind,
                                  data=task.model_dump(mode="json"))
                group = RolloutGroup(id=new_id(), run_id=run.id, task_instance_id=ti.id, index=t_index,
                                     size=spec.rollouts)
                instances.append(ti)
                groups.append(group)
                for k in range(spec.rollouts):
                    episodes.append(Episode(id=new_id(), seq=seq, run_id=run.id, group_id=group.id,
                                            task_instance_id=ti.id, sample_index=k))
                    seq += 1
            # No ORM relationships: insert parents before children.
            for rows in (instances, groups, episodes):
                s.add_all(rows)
                s.flush()
            group_ids = [g.id for g in groups]
            emit(s, "run.submitted", run.id, run.id, {"episodes": spec.n_episodes, "groups": len(group_ids)})
            return run.id, group_ids

    def publish(self, run_id: str, group_ids: list[str]) -> None:
        """Send the run's chord: one member per group, `run.done` as its body."""
        header = [self.app.signature("megaflow.group.start", args=(g,)) for g in group_ids]
        chord(header, self.app.signature("megaflow.run.done", args=(run_id,))).apply_async()
        with self.session() as s:
            s.execute(update(Run).where(Run.id == run_id, Run.status == "submitted").values(status="running"))

    # -- following ----------------------------------------------------------------

    def status(self, run_id: str) -> dict:
        """Counts of episodes by state, steps so far, mean reward of finished episodes (`db.run_stats`)."""
        with self.session() as s:
            run = s.get(Run, run_id)
            if run is None:
                raise LookupError(f"no run {run_id}")
            # Current episodes only: attempts that `resume` replaced are history.
            stats = run_stats(s, run_id)
            steps = s.execute(select(func.count()).select_from(Step).join(Episode, Episode.id == Step.episode_id)
                              .where(Episode.run_id == run_id)).scalar()
            waiting = dict(s.execute(select(Episode.wait_reason, func.count()).where(
                Episode.run_id == run_id, Episode.state == states.WAITING).group_by(Episode.wait_reason)).all())
            # Every episode ended long ago, yet the run's chord never closed: the repair
            # sweep closes it; until then a user must see why the run is still running.
            unclosed = run.status == "running" and chord_unclosed(s, run_id)
            return {"run_id": run_id, "name": run.name, "status": run.status, "episodes": run.n_episodes,
                    "by_state": stats.by_state, "steps": steps, "mean_reward": stats.mean_reward, "waiting": waiting,
                    "summary": run.summary, "chord_unclosed": unclosed}

    def wait(self, run_id: str, timeout: float | None = None, poll: float = 0.25) -> dict:
        """Block until the run is finished or cancelled; returns `status`.

        On PostgreSQL it sleeps on the run's notification channel (a group closed or
        the run ended, `scheduler.closing.notify_ready`) and looks again when woken,
        or after a second at most; on SQLite it looks every `poll` seconds.

        Raises:
            TimeoutError: still running after `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with Listener(self.db_url, ready_channel(run_id)) as listener:
            between = poll if self.db_url.startswith("sqlite") else max(poll, 1.0)
            while True:
                # Only the run's status (the full `status` counts every step of the run).
                with self.session() as s:
                    current = s.execute(select(Run.status).where(Run.id == run_id)).scalar()
                if current is None:
                    raise LookupError(f"no run {run_id}")
                if current in ("finished", "cancelled"):
                    return self.status(run_id)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    st = self.status(run_id)
                    raise TimeoutError(f"run {run_id} still {st['status']} after {timeout}s: {st['by_state']}")
                listener.wait(between if left is None else min(between, left))

    def cancel(self, run_id: str) -> dict[str, int]:
        """Cancel a run: pending and waiting episodes end now, running ones at their next decision.

        A CLI agent's episode whose program runs (parked) is woken at once: it ends
        ``cancelled`` and its sandbox, program and all, is destroyed.

        Returns:
            Episodes by the state they were in: ``pending`` and ``waiting`` (cancelled now),
            and those in flight (``provisioning``, ``running``, ``evaluating``), which end at
            their next decision.

        Raises:
            LookupError: no such run; nothing was changed.
        """
        with self.session() as s:
            if not s.execute(update(Run).where(Run.id == run_id).values(cancel_requested=True)).rowcount:
                raise LookupError(f"no run {run_id}")
            in_flight = dict(s.execute(select(Episode.state, func.count()).where(
                Episode.run_id == run_id, Episode.superseded_by.is_(None),
                Episode.state.in_((states.PROVISIONING, states.RUNNING, states.EVALUATING)))
                .group_by(Episode.state)).all())
            n = s.execute(update(Episode).where(Episode.run_id == run_id, Episode.state == states.PENDING)
                          .values(state=states.CANCELLED, exit_status=ExitStatus.CANCELLED)).rowcount
            # Waiting episodes' start messages are parked: send them so their chords close.
            parked = admission.unpark_cancelled(s, run_id)
            emit(s, "run.cancel", run_id, run_id, {"pending_cancelled": n, "waiting_cancelled": len(parked)})
        admission.send(self.app, parked)
        # A CLI agent's episode parks while its program runs: woken now, it ends cancelled (program killed).
        from megaflow.hops.cli_resume import wake_cancelled

        wake_cancelled(self, self.app, run_id)
        return {states.PENDING: n, states.WAITING: len(parked), **in_flight}

    def results(self, run_id: str) -> list[dict]:
        """One dict per episode: ids, state, exit status, reward, advantage, steps, grading summary.

        Raises:
            LookupError: no such run.
        """
        from megaflow.swebench_report import grading_summary

        with self.session() as s:
            if s.get(Run, run_id) is None:
                raise LookupError(f"no run {run_id}")
            rows = s.execute(
                select(Episode, TaskInstance.instance_id).join(TaskInstance, TaskInstance.id == Episode.task_instance_id)
                .where(Episode.run_id == run_id, Episode.superseded_by.is_(None)).order_by(Episode.seq)
            ).all()
            return [{"episode_id": e.id, "instance_id": iid, "sample": e.sample_index, "state": e.state,
                     "exit_status": e.exit_status, "reward": e.reward, "advantage": e.advantage,
                     "steps": e.n_steps, "error": e.error, "attempt": e.attempt,
                     **grading_summary(e.grading)} for e, iid in rows]

    def resume(self, run_id: str) -> dict:
        """Re-run a run's unfinished and infra-failed episodes as new attempts (`megaflow.resume`).

        Raises:
            LookupError: no such run.
            megaflow.resume.ResumeError: the run was cancelled.
        """
        from megaflow.resume import resume

        return resume(self, run_id)

    def export(self, run_id: str, fmt: str, path: str | Path, **options) -> int:
        """Write a run's episodes to `path`: ``jsonl``, ``parquet``, ``swebench`` or ``minisweagent``.

        Options (``tokenizer``, ``model_name``) are those of `megaflow.export.export_run`.

        Returns:
            How many records were written.

        Raises:
            LookupError: no such run.
            ValueError: unknown format.
            ImportError: ``parquet`` without pyarrow (``pip install 'megaflow[export]'``).
        """
        from megaflow.export import export_run

        with self.session() as s:
            return export_run(s, run_id, fmt, path, **options)

    def batches(self, run_id: str, groups_per_batch: int | None = None, tokenizer=None,
                timeout_s: float | None = None):
        """A run's complete rollout groups, G at a time, as their group callbacks close them.

        Iterate over it for `megaflow.rl.batches.Batch`es and call ``batch.ack()`` after each
        training step: an acknowledged batch is never handed out again; one taken and never
        acknowledged (the consumer died or closed the stream) goes to the next consumer. The
        iteration ends when the run has ended and every group was handed out; the last batch
        may hold fewer than G groups. Needs PostgreSQL (see `megaflow.rl.handoff`).

        Args:
            run_id: The run.
            groups_per_batch: G; default: the run's ``rl.groups_per_batch``.
            tokenizer: For turns whose backend recorded no token ids: a model name or a
                `megaflow.export.HFChatTokenizer`.
            timeout_s: Longest wait for one batch (`TimeoutError` after it); None: no limit.

        Returns:
            A `megaflow.rl.handoff.BatchStream`: an iterator, and a context manager that
            releases its connection.

        Raises:
            LookupError: no such run.
            ValueError: the database is SQLite, or G does not suit the run (no ``rl`` settings
                and no G, G < 1, or G above a bounded run's ``rl.groups_per_batch``).
        """
        from megaflow.rl.handoff import BatchStream

        return BatchStream(self.db_url, run_id, groups_per_batch, tokenizer=tokenizer, timeout_s=timeout_s)

    def publish_policy(self, path: str | Path, *, kind: str = "full", policy: str | None = None,
                       run_id: str | None = None, meta: dict | None = None) -> int:
        """Publish a checkpoint as its policy's next version; returns the version (1, 2, ...).

        Model workers of runs sampling this policy (``rl.policy``) switch to it between
        requests; episodes held by the runs' staleness bound that it unblocks start now.

        Args:
            path: A ``save_pretrained`` directory or state-dict file (`kind` ``full``), or a
                PEFT adapter directory (``lora``).
            policy: The policy name; default: run `run_id`'s ``rl.policy``, else ``default``.
            meta: Free JSON kept with the version (training step, metrics).

        Raises:
            megaflow.model.policy.PolicyError: `path` is missing or not a `kind` checkpoint;
                nothing was recorded.
            LookupError: `run_id` names no run.
        """
        from megaflow.model import policy as policies

        if policy is None and run_id is not None:
            with self.session() as s:
                run = s.get(Run, run_id)
                if run is None:
                    raise LookupError(f"no run {run_id}")
                rl = RunSpec.model_validate(run.spec).rl
                policy = rl.policy if rl is not None else None
        ref = policies.publish(self.session, str(path), kind=kind, policy=policy or "default", meta=meta)
        with self.session() as s:
            admitted = admission.admit_published(s, self.settings, ref.policy)
        admission.send(self.app, admitted)
        return ref.version

    def events(self, run_id: str) -> Counter:
        with self.session() as s:
            return Counter(s.execute(select(Event.kind).where(Event.run_id == run_id)).scalars())


def as_spec(spec: RunSpec | dict | str | Path) -> RunSpec:
    if isinstance(spec, RunSpec):
        return spec
    if isinstance(spec, dict):
        return RunSpec.parse(spec)
    if isinstance(spec, (str, Path)):
        return RunSpec.load(spec)
    raise SpecError(f"cannot make a RunSpec from {type(spec).__name__}")
