"""Deadlines: every phase of an episode has one, and every task finishes well inside RabbitMQ's consumer timeout.

RabbitMQ closes a consumer's channel when a delivery stays unacknowledged longer
than its ``consumer_timeout`` (30 minutes by default). With late acks a task's
message is unacknowledged for as long as the task runs, so a task that could run
that long would be noticed only by the broker, as a channel error that also
redelivers every other message of that worker. MegaFlow keeps three layers of
limits below it (``Settings.consumer_timeout_s`` says what the broker's is):

1. **Phase deadlines** (``RunSpec.limits``), enforced inside each hop:
   ``provision_timeout_s`` (sandbox creation and all setup together),
   ``model_timeout_s`` (one model call, its client's own retries included),
   ``exec_timeout_s`` (one command, also cut short by the episode's deadline),
   ``eval_timeout_s`` (the whole evaluation) and ``episode_timeout_s`` (checked at
   every decision). A spec whose phase deadline does not fit below the task limit
   is refused at submit (`check_spec`).
2. **Task time limits** (`task_time_limits`): a soft and a hard limit per task,
   hard = consumer timeout − `BROKER_MARGIN_S` for hops, short ones for decisions
   and callbacks. Celery enforces them only in its prefork pool (a worker started
   with ``MEGAFLOW_WORKER_POOL=prefork``); the threads pools (the default for all
   three) have `megaflow.watchdog` for that.
3. The broker's ``consumer_timeout`` itself, which nothing should reach.

A hop that runs out of its phase deadline is an infra failure, retried with
backoff where retrying can help (provisioning, model calls), kept apart from the
agent's own failures.
"""

from __future__ import annotations

import datetime as dt

from megaflow.config import Settings
from megaflow.errors import SpecError

#: Hard task limits stay this far below the broker's consumer timeout.
BROKER_MARGIN_S = 60.0
#: What a hop may need beyond its phase deadline: database round trips, sandbox bookkeeping.
HOP_OVERHEAD_S = 120.0
#: Soft limit = hard limit − this: time for the task to record its own failure.
SOFT_GRACE_S = 30.0
#: Decisions, group and run callbacks: short database work (plus a broker outage's publish retries).
CALLBACK_LIMITS_S = (240.0, 300.0)

HOP_TASKS = ("megaflow.hop.provision", "megaflow.hop.generate", "megaflow.hop.exec", "megaflow.hop.evaluate",
             "megaflow.hop.release")
CALLBACK_TASKS = ("megaflow.episode", "megaflow.group.start", "megaflow.group.done", "megaflow.run.done")
#: Phase deadline of each spec field, and the hop it bounds.
PHASES = {"provision_timeout_s": "provision", "model_timeout_s": "generate", "exec_timeout_s": "exec",
          "eval_timeout_s": "evaluate"}


def hop_hard_limit_s(settings: Settings) -> float:
    return settings.consumer_timeout_s - BROKER_MARGIN_S


def max_phase_s(settings: Settings) -> float:
    """The longest phase deadline a spec may ask for on this broker."""
    return hop_hard_limit_s(settings) - SOFT_GRACE_S - HOP_OVERHEAD_S


def task_time_limits(settings: Settings) -> dict[str, tuple[float, float]]:
    """(soft, hard) seconds per task name; every hard limit is below the consumer timeout."""
    hard = hop_hard_limit_s(settings)
    limits = {name: (hard - SOFT_GRACE_S, hard) for name in HOP_TASKS}
    soft_cb, hard_cb = CALLBACK_LIMITS_S
    hard_cb = min(hard_cb, hard)
    limits.update({name: (min(soft_cb, hard_cb - SOFT_GRACE_S), hard_cb) for name in CALLBACK_TASKS})
    return limits


def check_spec(spec, settings: Settings) -> None:
    """Refuse a spec whose phase deadlines could outlive their tasks on this broker.

    Raises:
        SpecError: naming each offending limit and what to do about it.
    """
    longest = max_phase_s(settings)
    problems = [f"  - limits.{field}: {getattr(spec.limits, field):g}s is over the {longest:g}s a "
                f"{hop} hop may take here" for field, hop in PHASES.items() if getattr(spec.limits, field) > longest]
    model_timeout = getattr(spec.model, "timeout_s", None)
    if model_timeout is not None and model_timeout > longest:
        problems.append(f"  - model.timeout_s: {model_timeout:g}s is over the {longest:g}s a model call may take here")
    if problems:
        raise SpecError(
            "invalid spec: deadlines do not fit the broker's consumer timeout "
            f"(MEGAFLOW_CONSUMER_TIMEOUT_S={settings.consumer_timeout_s:g}s; raise it together with RabbitMQ's "
            "consumer_timeout, or lower the limits):\n" + "\n".join(problems))


def remaining_s(deadline_at: dt.datetime | None, cap: float, floor: float = 1.0) -> float:
    """`cap`, or less when the episode's deadline comes sooner (never below `floor`)."""
    if deadline_at is None:
        return cap
    if deadline_at.tzinfo is None:  # SQLite hands back naive UTC
        deadline_at = deadline_at.replace(tzinfo=dt.UTC)
    left = (deadline_at - dt.datetime.now(dt.UTC)).total_seconds()
    return max(floor, min(cap, left))


class Budget:
    """One deadline shared by several commands of a phase (setup, evaluation).

    Args:
        seconds: the whole phase's budget.
        what: the phase, for error messages.
    """

    def __init__(self, seconds: float, what: str = "phase"):
        import time

        self._clock = time.monotonic
        self.seconds, self.what = seconds, what
        self.deadline = self._clock() + seconds

    @property
    def exhausted(self) -> bool:
        return self._clock() >= self.deadline

    def left(self, floor: float = 1.0) -> float:
        """Seconds left for the next command (at least `floor`, so it still gets a chance to run)."""
        return max(floor, self.deadline - self._clock())

    def message(self) -> str:
        return f"{self.what} used up its {self.seconds:g}s deadline"
