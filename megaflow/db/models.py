"""SQLAlchemy 2 models: all durable MegaFlow state.

The same models serve PostgreSQL (production) and SQLite (the embedded default).
Large content (messages, observations, patches) lives here, never in RabbitMQ.
"""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, String, Text, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only autoincrements INTEGER PRIMARY KEY; Postgres wants BIGINT for big tables.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    pass


Timestamp = DateTime(timezone=True)


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    user: Mapped[str] = mapped_column(String(100), default="default")
    project: Mapped[str] = mapped_column(String(100), default="default")
    spec: Mapped[dict] = mapped_column(JSON)
    # submitted -> running -> finished | cancelled
    status: Mapped[str] = mapped_column(String(20), default="submitted")
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    n_episodes: Mapped[int] = mapped_column(Integer, default=0)
    # Bumped by `megaflow resume`: callbacks of an older generation's chords do nothing.
    generation: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    summary: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)


class TaskInstance(Base):
    """One dataset row: what the agent must do and how it is evaluated."""

    __tablename__ = "task_instances"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    instance_id: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(20))
    data: Mapped[dict] = mapped_column(JSON)


class RolloutGroup(Base):
    """k rollouts of one task instance: one Celery chord."""

    __tablename__ = "groups"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    task_instance_id: Mapped[str] = mapped_column(ForeignKey("task_instances.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    stats: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)


class Episode(Base):
    __tablename__ = "episodes"
    __table_args__ = (Index("ix_episodes_state_seq", "state", "seq"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    # Global submission order: FIFO admission across runs follows it.
    seq: Mapped[int] = mapped_column(BigId, index=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.id", ondelete="CASCADE"), index=True)
    task_instance_id: Mapped[str] = mapped_column(ForeignKey("task_instances.id", ondelete="CASCADE"))
    sample_index: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(20), default="pending")
    # Why it ended: submitted, step_limit, token_limit, time_limit, format_errors,
    # context_length, model_error, sandbox_error, cancelled, ...
    exit_status: Mapped[str | None] = mapped_column(String(40), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    reward: Mapped[float | None] = mapped_column(Float, nullable=True)
    advantage: Mapped[float | None] = mapped_column(Float, nullable=True)
    n_steps: Mapped[int] = mapped_column(Integer, default=0)
    format_errors: Mapped[int] = mapped_column(Integer, default=0)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    sandbox_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    host: Mapped[str | None] = mapped_column(String(200), nullable=True)
    patch: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Grading evidence (megaflow.envs.grading.Evaluation.record): per-test statuses,
    # FAIL_TO_PASS / PASS_TO_PASS success and failure lists, resolved, patch applied.
    grading: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    test_log: Mapped[str | None] = mapped_column(Text, nullable=True)  # capped, redacted
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)
    # Indexed: the metrics exporter reads episodes ended since its high-water mark (megaflow.ops.counters).
    finished_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True, index=True)
    deadline_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)
    # Admission (megaflow.scheduler): why a waiting episode waits, and the Celery
    # options (task id, chord) its start message is re-sent with when admitted.
    wait_reason: Mapped[str | None] = mapped_column(String(200), nullable=True)
    parked: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    admitted_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)
    # Resume (megaflow.resume): an unfinished or infra-failed episode is re-run as a new
    # row, attempt + 1; the old row keeps its history and points at its successor.
    attempt: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    retry_of: Mapped[str | None] = mapped_column(String(32), nullable=True)
    superseded_by: Mapped[str | None] = mapped_column(String(32), nullable=True)


class Step(Base):
    """One turn: the messages added, the model's completion, the action and its result."""

    __tablename__ = "steps"

    episode_id: Mapped[str] = mapped_column(ForeignKey("episodes.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Messages appended to the conversation before this turn's model call.
    messages_in: Mapped[list] = mapped_column(JSON)
    completion: Mapped[str | None] = mapped_column(Text, nullable=True)
    token_ids: Mapped[list | None] = mapped_column(JSON, nullable=True)
    logprobs: Mapped[list | None] = mapped_column(JSON, nullable=True)
    finish_reason: Mapped[str | None] = mapped_column(String(20), nullable=True)
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(100), nullable=True)
    # The published policy version that sampled this turn (None before any was published).
    policy_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The prompt as the backend tokenized it, where it says; a trainer scores these very ids.
    prompt_token_ids: Mapped[list | None] = mapped_column(JSON, nullable=True)
    # OpenAI-shaped tool calls of this turn's completion (native tool calling).
    tool_calls: Mapped[list | None] = mapped_column(JSON, nullable=True)
    # The tools (OpenAI shape) and tool choice a CLI agent's program offered with this call; None: the scaffold's.
    tools: Mapped[list | None] = mapped_column(JSON, nullable=True)
    tool_choice: Mapped[str | dict | None] = mapped_column(JSON, nullable=True)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    action: Mapped[str | None] = mapped_column(Text, nullable=True)
    observation: Mapped[str | None] = mapped_column(Text, nullable=True)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    model_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    exec_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    agent_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)


class PolicyVersion(Base):
    """A policy a trainer published: model workers switch to the newest between requests."""

    __tablename__ = "policy_versions"

    policy: Mapped[str] = mapped_column(String(200), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(10))  # full | lora
    meta: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)


class RLHandoff(Base):
    """A ready group handed out in an RL batch (`megaflow.rl`): to which consumer, and whether it acknowledged."""

    __tablename__ = "rl_handoffs"

    group_id: Mapped[str] = mapped_column(ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    batch_id: Mapped[str] = mapped_column(String(32), index=True)
    # The consumer's advisory-lock key: while the lock is held the consumer lives.
    consumer: Mapped[int] = mapped_column(BigInteger)
    handouts: Mapped[int] = mapped_column(Integer, default=1)
    claimed_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    acked_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)


class Hop(Base):
    """The idempotency ledger: one row per hop of a subject (episode, group or run).

    A redelivered hop finds its row and re-sends what it recorded instead of
    doing the work again: at-least-once delivery, exactly-once effect.
    """

    __tablename__ = "hops"

    subject_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    step_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    hop: Mapped[str] = mapped_column(String(40), primary_key=True)
    task_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(10), default="started")  # started | done
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    started_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    # Indexed: scale and the metrics exporter read hops finished since a time (megaflow.ops.counters).
    finished_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True, index=True)
    queued_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)


class Delivery(Base):
    """How often a message was delivered again after a delivery that did not finish.

    Written only for redelivered messages (`megaflow.delivery`): the common path costs nothing.
    """

    __tablename__ = "deliveries"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    task_name: Mapped[str] = mapped_column(String(100))
    task_id: Mapped[str] = mapped_column(String(64))
    count: Mapped[int] = mapped_column(Integer, default=1)
    first_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    last_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)


class SandboxRow(Base):
    __tablename__ = "sandboxes"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    backend: Mapped[str] = mapped_column(String(20))
    host: Mapped[str] = mapped_column(String(200), index=True)
    run_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    episode_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    image: Mapped[str | None] = mapped_column(String(300), nullable=True)
    mode: Mapped[str] = mapped_column(String(20), default="ephemeral")
    # creating -> in_use -> (idle, for persistent pools) -> destroyed
    state: Mapped[str] = mapped_column(String(20), default="creating")
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    destroyed_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)


class Event(Base):
    """Append-only lifecycle and completion events."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    ts: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow, server_default=func.now())
    run_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    subject_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    kind: Mapped[str] = mapped_column(String(40))
    data: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class Host(Base):
    """An env host: a machine whose env worker holds sandboxes (capacity, images, heartbeat)."""

    __tablename__ = "hosts"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    capacity: Mapped[int] = mapped_column(Integer)
    # Images present on the host: placement prefers hosts that need not build or load one.
    images: Mapped[list] = mapped_column(JSON, default=list)
    # up -> down (graceful stop); a host whose heartbeat is stale counts as down too, and
    # recovery marks it dead (its episodes re-homed); a heartbeat makes it up again.
    state: Mapped[str] = mapped_column(String(20), default="up")
    started_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)


class Semaphore(Base):
    """A distributed counting semaphore: `used` of `limit` (None: unlimited) slots taken."""

    __tablename__ = "semaphores"

    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    used: Mapped[int] = mapped_column(Integer, default=0)


class SemaphoreHolder(Base):
    """Who holds a slot: one row per (semaphore, holder), so a retried acquire never counts twice."""

    __tablename__ = "semaphore_holders"

    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    holder: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    acquired_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True, index=True)


class Quota(Base):
    """An administrative quota of a user or project: episodes at once, and in all."""

    __tablename__ = "quotas"

    scope: Mapped[str] = mapped_column(String(20), primary_key=True)  # user | project
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    max_concurrent: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    admitted_total: Mapped[int] = mapped_column(Integer, default=0)
