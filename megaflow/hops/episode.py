"""The episode driver: the agent-side decision between hops.

An episode is one Celery chord member. Its task (``megaflow.episode``, agent
queue) decides the next hop and replaces itself with ``hop | episode`` — the
replacement keeps the task id and the chord membership — until the episode
ends and the task returns the episode's summary to its group's chord.
"""

from __future__ import annotations

import datetime as dt
import logging
import time

from celery.exceptions import Ignore, Retry, SoftTimeLimitExceeded
from sqlalchemy import bindparam, insert, select
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from megaflow.agent import Command, FormatError, Submit
from megaflow.db import states
from megaflow.db.models import Episode, Run, Step, utcnow
from megaflow.db.sql import prepared, update_where
from megaflow.events import emit
from megaflow.db import ledger
from megaflow.hops.base import run_hop
from megaflow.hops.delay import delayed_options
from megaflow.model.base import Message
from megaflow.redact import redact_text
from megaflow.runtime import Runtime, get_runtime
from megaflow.scheduler import admission
from megaflow.scheduler.admission import parking_of
from megaflow.scheduler.admission import send as send_admitted
from megaflow.sandbox.base import ExecResult
from queues import topology

log = logging.getLogger(__name__)

HOP_TASKS = {
    "provision": "megaflow.hop.provision",
    "generate": "megaflow.hop.generate",
    "exec": "megaflow.hop.exec",
    "evaluate": "megaflow.hop.evaluate",
    "release": "megaflow.hop.release",
}
#: Hops that must run on the env host that holds the episode's sandbox.
HOST_BOUND = frozenset({"exec", "evaluate", "release"})


def episode_task(self, prev, episode_id):
    """Celery task body for ``megaflow.episode``.

    Nothing unexpected escapes it: a failed episode task would leave its episode
    in flight with no message to move it, and its chord member returned as a
    failure. Anything raised outside the decision's own crash handling (sending
    the next hop after the broker's retries, a bug) ends the episode
    ``infra_failed`` (``agent_crashed``) and returns it to its chord.
    """
    try:
        return _episode_step(self, prev, episode_id)
    except (Retry, Ignore, OperationalError, InterfaceError, SoftTimeLimitExceeded):
        raise
    except Exception as exc:  # noqa: BLE001 - see above
        log.error("episode %s: its task failed after %s; ending the episode", episode_id,
                  normalized(prev)["hop"], exc_info=True)
        return _end_crashed(self, episode_id, normalized(prev)["step"], exc)


def _end_crashed(task, episode_id: str, step: int, exc: Exception):
    """End the episode ``infra_failed`` in a transaction of its own; its summary for the chord (or the release)."""
    rt = get_runtime(task.app)
    error = redact_text(f"{type(exc).__name__}: {exc}")[:2000]
    rt.warm(episode_id)
    with rt.session() as s:
        driver = Driver(rt, s, episode_id)
        decision = driver.end(states.INFRA_FAILED, "agent_crashed", step, error=error)
        driver.save()
    if decision.get("final"):
        send_admitted(task.app, admission.after_end(rt, episode_id))
        return decision["summary"]
    if task.request.chord is None:  # handed to a continuation already: it returns to the chord
        return None
    return continue_with(task, next_signature(task.app, episode_id, decision["next"]))


def _episode_step(self, prev, episode_id):
    rt = get_runtime(self.app)
    prev = normalized(prev)
    key = (episode_id, prev["step"], f"agent.{prev['hop']}")
    fresh = {}

    def work(_ctx):
        rt.warm(episode_id)

        def write(s: Session):
            try:
                driver = Driver(rt, s, episode_id, parking=parking_of(self.request))
                fresh.update(driver.decide(prev))
                driver.save()
            except (OperationalError, InterfaceError, IntegrityError):
                # Lost connections retry; a collision is a replay (run_hop replays the record).
                raise
            except Exception as exc:
                raise DecisionCrashed(exc) from exc
        return fresh, write

    try:
        decision = run_hop(rt, self.request, key, work, side_effects=False, precheck=False)
    except DecisionCrashed as crash:
        # The crashed decision's transaction is rolled back whole (ledger row too);
        # record the episode's end in a new one. No savepoint on the common path.
        log.error("decision for episode %s after %s crashed: %r", episode_id, prev.get("hop"), crash.__cause__)
        error = f"{type(crash.__cause__).__name__}: {crash.__cause__}"[:2000]

        def crashed(_ctx):
            def write(s: Session):
                fresh.update(Driver(rt, s, episode_id).end(states.INFRA_FAILED, "agent_crashed", key[1], error=error))
            return fresh, write

        fresh.clear()
        decision = run_hop(rt, self.request, key, crashed, side_effects=False, precheck=False)
    if decision is not fresh and decision.get("next"):
        # Replayed decision: if its next hop is already claimed, another lineage of
        # this episode carries on; dropping this duplicate keeps the chord exact.
        nxt = decision["next"]
        with rt.session() as s:
            if ledger.exists(s, episode_id, nxt["step"], nxt["hop"]):
                raise Ignore()
    if decision.get("admit"):
        # Recorded by earlier versions: waiters the end let in, inside the decision.
        send_admitted(self.app, decision["admit"])
    if decision.get("final"):
        # The end is committed: give the slots back, and send the waiters they let in
        # (again on a replay: nothing to give back then, and their ledger drops doubles).
        try:
            admitted = admission.after_end(rt, episode_id, replay=decision is not fresh)
        except Exception:  # noqa: BLE001 - the episode has ended; its chord must still hear of it
            log.error("episode %s ended but its slots were not given back; the scheduler's repair "
                      "sweep will", episode_id, exc_info=True)
            admitted = []
        send_admitted(self.app, admitted)
    if decision.get("park"):
        # Waiting for room: the start message is parked in the episode's row and sent
        # again on admission; this delivery must not count as the chord member's end.
        self.request.chord = None
        return None
    if decision.get("final"):
        return decision["summary"]
    return continue_with(self, next_signature(self.app, episode_id, decision["next"]))


def continue_with(task, sig) -> None:
    """`Task.replace` without its exception.

    Like replace, the continuation takes over this task's id and its chord
    membership. Replace then raises `Ignore`, and Celery formats a full traceback
    for every Ignore: a fifth of an agent worker's time. Here the task returns
    normally instead, having handed its chord membership to the continuation —
    so this delivery's success is not counted as the episode's end.

    `sig` is ``hop | episode`` (`next_signature`). The message is the one
    ``sig.apply_async()`` would send — the hop, with the episode task as its chain
    carrying this task's id and chord options — built without Celery's canvas
    (freezing and cloning every step cost more than the publish itself).
    """
    req = task.request
    hop, then = sig.tasks
    then = dict(then, options=dict(then.options, task_id=req.id, reply_to=task.app.thread_oid,
                                   root_id=req.root_id, group_id=req.group, chord=req.chord,
                                   group_index=req.group_index))
    task.app.tasks[hop.task].apply_async(hop.args, hop.kwargs, root_id=req.root_id, chain=[then], **hop.options)
    req.chord = None


def normalized(prev) -> dict:
    """The previous hop's result with a `hop` and an integer `step`, whatever it held.

    A result missing them (a ledger row recorded by an older version's poison
    path, a hand-made message) must still reach the decision, which then ends the
    episode, rather than fail the task outside the decision's crash handling: a
    failed task leaves its episode running and its chord member never returns.
    """
    prev = dict(prev) if isinstance(prev, dict) else {}
    prev["hop"] = str(prev.get("hop") or ("unknown" if prev.get("error") else "start"))
    try:
        prev["step"] = int(prev.get("step") or 0)
    except (TypeError, ValueError):
        prev["step"] = 0
    return prev


class DecisionCrashed(Exception):
    """A scaffold or driver bug raised while deciding; carries the original as __cause__."""


def next_signature(app, episode_id: str, nxt: dict):
    hop, step = nxt["hop"], nxt["step"]
    options = {}
    if hop in HOST_BOUND or (hop == "provision" and nxt.get("host")):
        queue = topology.env_host_queue(nxt["host"]).name
        options = {"queue": queue, "exchange": topology.EXCHANGE.name, "routing_key": queue}
    if nxt.get("delay"):
        # A simulated service latency (RunSpec.simulate): the message waits on the broker.
        target = options.get("queue") or topology.TASK_QUEUES[HOP_TASKS[hop]]
        options = delayed_options(app, target, nxt["delay"])
    return app.signature(HOP_TASKS[hop], args=(episode_id, step), **options) | app.signature(
        "megaflow.episode", args=(episode_id,)
    )


class Driver:
    """Decides one step of one episode inside one transaction."""

    def __init__(self, rt: Runtime, session: Session, episode_id: str, parking: dict | None = None):
        self.rt, self.s = rt, session
        self.parking = parking
        # The run's cancel flag comes in the same query: one round trip, not two.
        # Core rows, not ORM objects: what a decision changes is written by `save`.
        conn = session.connection()
        row = conn.execute(prepared(conn, "driver.episode", _select_episode), {"k_id": episode_id}).first()
        if row is None:
            raise LookupError(f"episode {episode_id} not found")
        values = dict(row._mapping)
        self.cancel_requested = values.pop("cancel_requested")
        self.ep = Tracked(values)
        self._steps: list[Tracked] = []
        self.spec = rt.spec(self.ep.run_id)
        self.task = rt.task(self.ep.task_instance_id)
        self.agent = rt.agent(self.ep.run_id)
        self.t0 = time.monotonic()

    # -- outcomes -------------------------------------------------------------

    def go(self, hop: str, step: int) -> dict:
        nxt = {"hop": hop, "step": step, "host": self.ep.host}
        sim = self.spec.simulate
        if sim is not None:
            delay = {"generate": sim.model_latency_s, "exec": sim.exec_latency_s}.get(hop, 0.0)
            if delay:
                nxt["delay"] = delay
        return {"next": nxt}

    def final(self) -> dict:
        ep = self.ep
        # Its slots are given back once this decision commits (`admission.after_end`).
        return {"final": True, "summary": {
            "episode_id": ep.id, "state": ep.state, "reward": ep.reward, "exit_status": ep.exit_status}}

    def end(self, state: str, exit_status: str, step: int, error: str | None = None,
            reward: float | None = None) -> dict:
        values = {"exit_status": exit_status, "error": error}
        if reward is not None:
            values["reward"] = reward
        if states.move(self.s, self.ep.id, state, **values):
            emit(self.s, "episode.ended", self.ep.run_id, self.ep.id,
                 {"state": state, "exit_status": exit_status, "error": error})
        self.reload()
        if self.ep.sandbox_id or self.left_sandboxes():
            return self.go("release", step)
        return self.final()

    def left_sandboxes(self) -> bool:
        """Whether an episode ending without a sandbox may have left some on its host.

        Its provision began but never recorded one (killed deliveries, then poison):
        the release hop clears them before the episode's slot is given back, so
        they never count beyond the host's capacity. Rare, so one more read is fine.
        """
        return bool(self.ep.host) and ledger.exists(self.s, self.ep.id, 0, "provision")

    # -- the decision ---------------------------------------------------------

    def decide(self, prev: dict) -> dict:
        prev = normalized(prev)
        ep, hop, step = self.ep, prev["hop"], prev["step"]
        if ep.state in states.TERMINAL:
            if hop in ("release", "evaluate") or not ep.sandbox_id:
                return self.final()
            return self.go("release", step)
        if self.cancel_requested:
            return self.end(states.CANCELLED, "cancelled", step)
        # The deadline bounds the agent, not the grading of what it submitted in time.
        if ep.state != states.EVALUATING and ep.deadline_at and utcnow() > _aware(ep.deadline_at):
            return self.end(states.FAILED, "time_limit", step, reward=self.spec.limits.no_submit_penalty)
        if prev.get("error"):
            return self.failed_hop(prev, step)
        return getattr(self, f"after_{hop}")(step)

    def failed_hop(self, prev: dict, step: int) -> dict:
        kind = prev.get("kind", "infra")
        state = states.INFRA_FAILED if kind == "infra" else states.FAILED
        # An agent-side ending (context overflow) means it never submitted: the same
        # penalty as any other limit. Infra failures carry no reward at all.
        reward = self.spec.limits.no_submit_penalty if kind == "agent" else None
        return self.end(state, prev.get("exit_status") or f"{prev['hop']}_error", step, error=prev["error"],
                        reward=reward)

    def after_start(self, step: int) -> dict:
        if self.ep.state == states.WAITING:
            return {"park": True}
        ok, host = admission.start(self.s, self.rt.settings, self.ep, admission.claim_of(self.rt, self.ep),
                                   self.parking or {})
        if not ok:
            return {"park": True}
        return self.provision(host, admitted_at=utcnow())

    def after_admit(self, step: int) -> dict:
        if self.ep.state == states.WAITING:
            # Sent before its admission committed (a replayed end): wait for the real one.
            return {"park": True}
        return self.provision(self.ep.host)

    def provision(self, host: str | None, **values) -> dict:
        limits = self.spec.limits
        # Write the host only when it is new: re-writing the one read earlier could undo
        # a host recovery that re-homed the episode meanwhile (megaflow.scheduler.recovery).
        placed = {"host": host} if host != self.ep.host else {}
        states.move(self.s, self.ep.id, states.PROVISIONING, **placed, **values,
                    deadline_at=utcnow() + dt.timedelta(seconds=limits.episode_timeout_s))
        return {"next": {"hop": "provision", "step": 0, "host": host}}

    def after_provision(self, step: int) -> dict:
        states.move(self.s, self.ep.id, states.RUNNING)
        self.new_step(0, self.agent.start(self.task))
        return self.turn(0)

    def after_generate(self, step: int) -> dict:
        row = self.step(step)
        return self.act(self.agent.parse(row.completion or ""), row)

    def after_exec(self, step: int) -> dict:
        row = self.step(step)
        result = ExecResult(exit_code=row.exit_code if row.exit_code is not None else -1,
                            stdout=row.observation or "", timed_out=row.exit_code == 124)
        if self.agent.finished(result) is not None:
            # Submitted through the command's output (mini-swe-agent): the command stays the action.
            return self.submit(row)
        return self.next_turn(step + 1, self.agent.observe(result, row.action or ""))

    def after_evaluate(self, step: int) -> dict:
        if states.move(self.s, self.ep.id, states.SUCCEEDED):
            emit(self.s, "episode.ended", self.ep.run_id, self.ep.id,
                 {"state": states.SUCCEEDED, "exit_status": self.ep.exit_status, "reward": self.ep.reward})
        self.reload()
        return self.final()

    def after_release(self, step: int) -> dict:
        return self.final()

    # -- helpers --------------------------------------------------------------

    def turn(self, step: int) -> dict:
        """Ask the model for step `step`, unless the scaffold acts on its own."""
        action = self.agent.scripted_action(self.task, step)
        if action is None:
            return self.go("generate", step)
        return self.act(action, self.step(step))

    def next_turn(self, step: int, messages: list[Message]) -> dict:
        limits = self.spec.limits
        if step >= limits.max_steps:
            return self.end(states.FAILED, "step_limit", step - 1, reward=limits.no_submit_penalty)
        if self.ep.tokens > limits.max_tokens:
            return self.end(states.FAILED, "token_limit", step - 1, reward=limits.no_submit_penalty)
        self.new_step(step, messages)
        return self.turn(step)

    def act(self, action, row: Tracked) -> dict:
        row.agent_s = (row.agent_s or 0.0) + (time.monotonic() - self.t0)
        if isinstance(action, Command):
            row.action = action.cmd
            return self.go("exec", row.index)
        if isinstance(action, Submit):
            row.action = "submit"
            return self.submit(row)
        assert isinstance(action, FormatError)
        row.observation = action.feedback
        self.ep.format_errors += 1
        if self.ep.format_errors > self.spec.limits.max_format_errors:
            return self.end(states.FAILED, "format_errors", row.index, reward=self.spec.limits.no_submit_penalty)
        return self.next_turn(row.index + 1, [Message(role="user", content=action.feedback)])

    def submit(self, row: Tracked) -> dict:
        states.move(self.s, self.ep.id, states.EVALUATING, exit_status="submitted")
        return self.go("evaluate", row.index)

    def new_step(self, index: int, messages: list[Message]) -> None:
        conn = self.s.connection()
        conn.execute(prepared(conn, "driver.new_step", lambda c: insert(_STEPS)),
                     {"episode_id": self.ep.id, "index": index, "messages_in": [m.model_dump() for m in messages]})
        self.ep.n_steps = index + 1

    # -- rows -------------------------------------------------------------------

    def step(self, index: int) -> Tracked:
        """The columns of step `index` a decision reads (not its messages, token ids or logprobs)."""
        conn = self.s.connection()
        row = conn.execute(prepared(conn, "driver.step", _select_step),
                           {"k_episode_id": self.ep.id, "k_index": index}).one()
        self._steps.append(Tracked(row._mapping))
        return self._steps[-1]

    def save(self) -> None:
        """Write the columns this decision set on the episode and on the steps it read."""
        if self.ep.changes:
            update_where(self.s.connection(), _EPISODES, {"id": self.ep.id}, self.ep.changes)
            self.ep.changes.clear()
        for row in self._steps:
            if row.changes:
                update_where(self.s.connection(), _STEPS, {"episode_id": self.ep.id, "index": row.index}, row.changes)
                row.changes.clear()

    def reload(self) -> None:
        """Save, then read the episode again (after a move)."""
        self.save()
        conn = self.s.connection()
        row = conn.execute(prepared(conn, "driver.reload", lambda c: select(_EPISODES).where(
            _EPISODES.c.id == bindparam("k_id"))), {"k_id": self.ep.id}).one()
        self.ep = Tracked(row._mapping)


_EPISODES, _RUNS, _STEPS = Episode.__table__, Run.__table__, Step.__table__


def _select_episode(conn):
    return (select(_EPISODES, _RUNS.c.cancel_requested).join(_RUNS, _RUNS.c.id == _EPISODES.c.run_id)
            .where(_EPISODES.c.id == bindparam("k_id")))


def _select_step(conn):
    c = _STEPS.c
    return select(c.index, c.completion, c.action, c.observation, c.exit_code, c.agent_s).where(
        c.episode_id == bindparam("k_episode_id"), c.index == bindparam("k_index"))


class Tracked:
    """A row read with Core: its columns as attributes; those set since are kept in `changes`."""

    def __init__(self, values):
        self.__dict__.update(values)
        self.__dict__["changes"] = {}

    def __setattr__(self, name: str, value) -> None:
        self.__dict__[name] = value
        self.changes[name] = value


def _aware(ts: dt.datetime) -> dt.datetime:
    # SQLite hands back naive datetimes; they were written in UTC.
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.UTC)
