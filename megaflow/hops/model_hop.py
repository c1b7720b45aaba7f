"""``megaflow.hop.generate``: one model call (model queue)."""

from __future__ import annotations

import logging
import random

from sqlalchemy import bindparam, select, update

from megaflow.db.models import Episode, Step
from megaflow.db.sql import prepared
from megaflow.errors import AgentError, InfraError, ModelUnavailableError, RateLimitedError
from megaflow.db.states import ExitStatus
from megaflow.hops.base import run_hop
from megaflow.contract import HopResult, failure
from megaflow.hops.throttle import model_slot, requeue
from megaflow.model.base import Message, ModelRequest
from megaflow.runtime import get_runtime
from megaflow.scheduler import staleness
from megaflow.sanitize import storable

log = logging.getLogger(__name__)

#: Longest backoff between two retries of a failed model call (seconds).
MAX_BACKOFF_S = 60.0


_S, _E = Step.__table__, Episode.__table__
_STEP_RESULT = ("completion", "token_ids", "logprobs", "finish_reason", "model", "model_version", "prompt_tokens",
                "completion_tokens", "model_s", "tool_calls")


#: What an RL trainer reads besides: the policy version that sampled the turn, the prompt's token ids.
_RL_RESULT = ("policy_version", "prompt_token_ids")


def _update_step(conn):
    return update(_S).where(_S.c.episode_id == bindparam("k_episode_id"), _S.c.index == bindparam("k_index")).values(
        {c: bindparam(f"v_{c}", type_=_S.c[c].type) for c in _STEP_RESULT + _RL_RESULT})


def conversation(session, episode_id: str, upto: int) -> list[Message]:
    """Every message of an episode before step `upto`'s model call."""
    return turn_input(session, episode_id, upto)[0]


def turn_input(session, episode_id: str, upto: int) -> tuple[list[Message], list[dict] | None, str | dict | None]:
    """`conversation`, and the tools and tool choice recorded with step `upto`'s call (a CLI program's own)."""
    conn = session.connection()
    rows = conn.execute(prepared(conn, "model.conversation", lambda c: select(
        _S.c.index, _S.c.messages_in, _S.c.completion, _S.c.tool_calls, _S.c.tools, _S.c.tool_choice).where(
        _S.c.episode_id == bindparam("k_episode_id"), _S.c.index <= bindparam("k_upto")).order_by(_S.c.index)),
        {"k_episode_id": episode_id, "k_upto": upto}).all()
    messages: list[Message] = []
    tools = tool_choice = None
    for index, messages_in, completion, tool_calls, offered, choice in rows:
        messages.extend(Message(**m) for m in messages_in)
        if index < upto and completion is not None:
            # The model's earlier tool calls go back with its text: the tool results that follow answer them.
            messages.append(Message(role="assistant", content=completion, tool_calls=tool_calls or None))
        if index == upto:
            tools, tool_choice = offered, choice
    return messages, tools, tool_choice


def with_ids(calls: list[dict] | None, step: int) -> list[dict] | None:
    """Tool calls as stored: each with an id (the tool message answering it names it) and its type."""
    if not calls:
        return None
    return [{**c, "id": c.get("id") or f"call_{step}_{i}", "type": "function"} for i, c in enumerate(calls)]


def generate_task(self, episode_id: str, step: int, waits: int = 0):
    """Celery task body for ``megaflow.hop.generate``; `waits` counts re-queues for rate limits."""
    rt = get_runtime(self.app)

    def load(s):
        return (rt.refs_in(s, episode_id)[0], *turn_input(s, episode_id, step))

    def work(ctx):
        run_id, messages, offered, tool_choice = ctx
        spec = rt.spec(run_id)
        agent = rt.agent(run_id)
        if hasattr(agent, "prompt"):  # the computer scaffold: screenshot references become images, old ones notes
            try:
                messages = agent.prompt(messages, rt.settings.data_dir)
            except InfraError as exc:  # a screenshot this host cannot read: no retry will find it
                return failure("generate", step, str(exc), ExitStatus.MODEL_UNAVAILABLE).wire(), None
        request = ModelRequest(messages=messages, sampling=spec.model.sampling, request_id=f"{episode_id}:{step}",
                               timeout_s=spec.limits.model_timeout_s,
                               # A CLI program's call offers its own tools; any other, its scaffold's.
                               tools=offered if offered is not None else getattr(agent, "tools", None),
                               tool_choice=tool_choice)
        try:
            # An rl run's client switches to the newest published weights first (a safe point).
            newest = rt.follow(run_id)
            with model_slot(rt, spec, run_id, request) as usage:
                completion = rt.model(run_id).generate(request)
                usage.tokens = completion.usage.prompt_tokens + completion.usage.completion_tokens
            if newest is not None and not staleness.turn_within(newest, completion.policy_version, spec.rl.bound):
                # The worker could not switch in time (a failed load): retried, never recorded.
                raise ModelUnavailableError(f"sampled with policy version {completion.policy_version}, more than "
                                            f"{spec.rl.bound} behind the newest, {newest}")
        except RateLimitedError as exc:
            raise requeue(self, exc, waits) from exc
        except AgentError as exc:
            status = ExitStatus.CONTEXT_LENGTH if isinstance(exc, ValueError) else ExitStatus.MODEL_ERROR
            return failure("generate", step, str(exc), status, kind="agent").wire(), None
        except InfraError as exc:
            if self.request.retries < spec.limits.model_retries:
                backoff = spec.limits.model_retry_backoff_s * 2 ** self.request.retries
                countdown = min(MAX_BACKOFF_S, getattr(exc, "retry_after", None) or backoff)
                raise self.retry(exc=exc, countdown=countdown * (0.5 + random.random()))
            return failure("generate", step, str(exc), ExitStatus.MODEL_UNAVAILABLE).wire(), None

        def write(s):
            conn = s.connection()
            conn.execute(prepared(conn, "model.step", _update_step), {
                "k_episode_id": episode_id, "k_index": step,
                "v_completion": storable(completion.text), "v_token_ids": completion.token_ids,
                "v_logprobs": completion.logprobs, "v_finish_reason": completion.finish_reason,
                "v_model": completion.model, "v_model_version": completion.model_version,
                "v_prompt_tokens": completion.usage.prompt_tokens,
                "v_completion_tokens": completion.usage.completion_tokens, "v_model_s": completion.latency_s,
                "v_policy_version": completion.policy_version if newest is not None else None,
                "v_prompt_token_ids": completion.prompt_token_ids,
                "v_tool_calls": with_ids(completion.tool_calls, step),
            })
            used = completion.usage.prompt_tokens + completion.usage.completion_tokens
            conn.execute(prepared(conn, "model.tokens", lambda c: update(_E).where(_E.c.id == bindparam("k_id"))
                                  .values(tokens=_E.c.tokens + bindparam("v_used", type_=_E.c.tokens.type))),
                         {"k_id": episode_id, "v_used": used})

        return HopResult(hop="generate", step=step).wire(), write

    return run_hop(rt, self.request, (episode_id, step, "generate"), work, side_effects=False, load=load)

