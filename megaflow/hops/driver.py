"""The heart of an episode: from what the last hop did, decide what happens next.

The `Driver` is pure: it reads and writes its episode only through `EpisodeRows`
(`megaflow.hops.rows`) and asks the run's scaffold (`megaflow.agent`) what the model's
reply means. It never sends a message; the episode task (`megaflow.hops.episode`)
does, from the `Decision` returned. The in-process runner
(`megaflow.hops.inprocess`) drives it without Celery in the unit tests.
"""

from __future__ import annotations

import datetime as dt
import time

from megaflow.agent import Agent, Command, FormatError, Submit
from megaflow.db import states
from megaflow.db.models import utcnow
from megaflow.db.states import ExitStatus
from megaflow.contract import Decision, HopResult, Next, Summary, error_text
from megaflow.db.sql import Tracked
from megaflow.hops.rows import EpisodeRows
from megaflow.model.base import Message
from megaflow.sandbox.base import ExecResult
from megaflow.spec import RunSpec


class Driver:
    """Decides one step of one episode (inside the caller's transaction)."""

    def __init__(self, rows: EpisodeRows, spec: RunSpec, task, agent: Agent, parking: dict | None = None):
        self.rows, self.spec, self.task, self.agent = rows, spec, task, agent
        #: The start message's Celery options, parked with the episode if it must wait.
        self.parking = parking
        self.t0 = time.monotonic()

    @property
    def ep(self) -> Tracked:
        return self.rows.ep

    # -- the decision ---------------------------------------------------------

    def decide(self, prev: HopResult) -> Decision:
        ep, hop, step = self.ep, prev.hop, prev.step
        if ep.state in states.TERMINAL:
            if hop in ("release", "evaluate") or not ep.sandbox_id:
                return self.final()
            return self.go("release", step)
        if self.rows.cancel_requested:
            return self.end(states.CANCELLED, ExitStatus.CANCELLED, step)
        # The deadline bounds the agent, not the grading of what it submitted in time.
        if ep.state != states.EVALUATING and ep.deadline_at and utcnow() > _aware(ep.deadline_at):
            return self.end(states.FAILED, ExitStatus.TIME_LIMIT, step, reward=self.spec.limits.no_submit_penalty)
        if prev.failed:
            return self.failed_hop(prev)
        if hop == "provision" and prev.exit_code is not None:
            return self.after_provision_and_exec()
        after = _AFTER.get(hop)
        if after is None:
            raise ValueError(f"no decision follows a {hop!r} hop")
        return after(self, step)

    def failed_hop(self, prev: HopResult) -> Decision:
        kind = prev.kind or "infra"
        state = states.INFRA_FAILED if kind == "infra" else states.FAILED
        # An agent-side ending (context overflow) means it never submitted: the same
        # penalty as any other limit. Infra failures carry no reward at all.
        reward = self.spec.limits.no_submit_penalty if kind == "agent" else None
        return self.end(state, prev.exit_status or ExitStatus.crashed(prev.hop), prev.step, error=prev.error,
                        reward=reward)

    def after_start(self, step: int) -> Decision:
        if self.ep.state == states.WAITING:
            return Decision(park=True)
        ok, host = self.rows.admit(self.parking or {})
        if not ok:
            return Decision(park=True)
        return self.provision(host, admitted_at=utcnow())

    def after_admit(self, step: int) -> Decision:
        if self.ep.state == states.WAITING:
            # Sent before its admission committed (a replayed end): wait for the real one.
            return Decision(park=True)
        return self.provision(self.ep.host)

    def provision(self, host: str | None, **values) -> Decision:
        # Write the host only when it is new: re-writing the one read earlier could undo
        # a host recovery that re-homed the episode meanwhile (megaflow.scheduler.recovery).
        placed = {"host": host} if host != self.ep.host else {}
        self.rows.move(states.PROVISIONING, **placed, **values,
                       deadline_at=utcnow() + dt.timedelta(seconds=self.spec.limits.episode_timeout_s))
        return Decision(next=Next(hop="provision", step=0, host=host))

    def after_provision(self, step: int) -> Decision:
        self.rows.move(states.RUNNING)
        self.new_step(0, self.agent.start(self.task))
        return self.turn(0)

    def after_provision_and_exec(self) -> Decision:
        # The provision hop also ran step 0's scripted command and recorded the step
        # (`command_at_provision`): decide as after that command's own exec hop.
        self.rows.move(states.RUNNING)
        self.ep.n_steps = 1
        return self.after_exec(0)

    def after_generate(self, step: int) -> Decision:
        row = self.rows.step(step)
        return self.act(self.agent.parse(row.completion or "", **self.tool_calls(row)), row)

    def after_exec(self, step: int) -> Decision:
        row = self.rows.step(step)
        if getattr(self.agent, "detached", False):
            return self.after_program(step, row)
        result = ExecResult(exit_code=row.exit_code if row.exit_code is not None else -1,
                            stdout=row.observation or "", timed_out=row.exit_code == 124)
        if self.agent.finished(result) is not None:
            # Submitted through the command's output (mini-swe-agent): the command stays the action.
            return self.submit(row)
        return self.next_turn(step + 1, self.agent.observe(result, row.action or "", **self.tool_calls(row)))

    def tool_calls(self, row: Tracked) -> dict:
        """The turn's tool calls, for a tool-calling scaffold (one with `tools`); text scaffolds get none."""
        return {"tool_calls": getattr(row, "tool_calls", None)} if getattr(self.agent, "tools", None) else {}

    def after_program(self, step: int, row: Tracked) -> Decision:
        """A CLI agent's episode (`megaflow.agent.cli`): one long program instead of turns.

        Step 0 started the program in the sandbox; it now calls the model through the
        proxy (`megaflow.hops.cli_proxy`), each call a step of its own. The episode parks,
        holding no thread and no message, with this task's chord options kept in its
        row; the proxy sends the next decision when the program exits (a later step,
        graded as a submit) or its deadline passes (`decide` ends it then).
        """
        if step > 0:
            return self.submit(row)
        if row.exit_code != 0:
            return self.end(states.INFRA_FAILED, ExitStatus.SETUP_FAILED, step,
                            error=f"the agent program did not start: {(row.observation or '')[-500:]}")
        self.ep.parked = {"task": self.parking, "cli": True}
        return Decision(park=True)

    def after_evaluate(self, step: int) -> Decision:
        self.rows.move(states.SUCCEEDED, event={"state": states.SUCCEEDED, "exit_status": self.ep.exit_status,
                                                 "reward": self.ep.reward})
        self.rows.reload()
        return self.final()

    def after_release(self, step: int) -> Decision:
        return self.final()

    # -- outcomes -------------------------------------------------------------

    def go(self, hop: str, step: int) -> Decision:
        sim = self.spec.simulate
        delay = {"generate": sim.model_latency_s, "exec": sim.exec_latency_s}.get(hop) if sim else None
        return Decision(next=Next(hop=hop, step=step, host=self.ep.host, delay=delay or None))

    def final(self) -> Decision:
        ep = self.ep
        # Its slots are given back once this decision commits (`admission.after_end`).
        return Decision(final=Summary(episode_id=ep.id, state=ep.state, reward=ep.reward,
                                      exit_status=ep.exit_status))

    def end(self, state: str, exit_status: ExitStatus, step: int, error: str | None = None,
            reward: float | None = None) -> Decision:
        """End the episode in `state` (if nothing ended it first), then release its sandbox or finish."""
        values = {"exit_status": exit_status, "error": error}
        if reward is not None:
            values["reward"] = reward
        self.rows.move(state, event={"state": state, "exit_status": exit_status, "error": error}, **values)
        self.rows.reload()
        if self.ep.sandbox_id or self.left_sandboxes():
            return self.go("release", step)
        return self.final()

    def crashed(self, step: int, exc: BaseException) -> Decision:
        """End the episode ``infra_failed`` (``agent_crashed``): deciding it raised `exc` (a scaffold or driver bug)."""
        return self.end(states.INFRA_FAILED, ExitStatus.AGENT_CRASHED, step, error=error_text(exc))

    def left_sandboxes(self) -> bool:
        """Whether an episode ending without a sandbox may have left some on its host.

        Its provision began but never recorded one (killed deliveries, then poison):
        the release hop clears them before the episode's slot is given back, so
        they never count beyond the host's capacity. Rare, so one more read is fine.
        """
        return bool(self.ep.host) and self.rows.hop_recorded(0, "provision")

    # -- turns ----------------------------------------------------------------

    def turn(self, step: int) -> Decision:
        """Ask the model for step `step`, unless the scaffold acts on its own."""
        action = self.agent.scripted_action(self.task, step)
        if action is None:
            return self.go("generate", step)
        return self.act(action, self.rows.step(step))

    def next_turn(self, step: int, messages: list[Message]) -> Decision:
        limits = self.spec.limits
        if step >= limits.max_steps:
            return self.end(states.FAILED, ExitStatus.STEP_LIMIT, step - 1, reward=limits.no_submit_penalty)
        if self.ep.tokens > limits.max_tokens:
            return self.end(states.FAILED, ExitStatus.TOKEN_LIMIT, step - 1, reward=limits.no_submit_penalty)
        self.new_step(step, messages)
        return self.turn(step)

    def act(self, action, row: Tracked) -> Decision:
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
            return self.end(states.FAILED, ExitStatus.FORMAT_ERRORS, row.index,
                            reward=self.spec.limits.no_submit_penalty)
        return self.next_turn(row.index + 1, list(action.messages) or [Message(role="user", content=action.feedback)])

    def submit(self, row: Tracked) -> Decision:
        self.rows.move(states.EVALUATING, exit_status=ExitStatus.SUBMITTED)
        return self.go("evaluate", row.index)

    def new_step(self, index: int, messages: list[Message]) -> None:
        self.rows.new_step(index, messages)
        self.ep.n_steps = index + 1


def command_at_provision(spec: RunSpec, task, agent: Agent) -> str | None:
    """Step 0's command, when the provision hop may run it itself; else None.

    Only for the oracle, whose commands are fixed before anything runs: the
    provision hop then runs the first one right after setup and records step 0
    as the decision after provision and that command's exec hop would have. That is
    one decision and one hop fewer per episode (`megaflow bench swe`). Not with
    simulated latencies, which stand for a real exec hop.
    """
    if spec.agent.type != "oracle" or spec.simulate is not None:
        return None
    action = agent.scripted_action(task, 0)
    return action.cmd if isinstance(action, Command) else None


_AFTER = {"start": Driver.after_start, "admit": Driver.after_admit, "provision": Driver.after_provision,
          "generate": Driver.after_generate, "exec": Driver.after_exec, "evaluate": Driver.after_evaluate,
          "release": Driver.after_release}


def _aware(ts: dt.datetime) -> dt.datetime:
    # SQLite hands back naive datetimes; they were written in UTC.
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.UTC)
