"""Tier-1 limits around the model hop: hold a slot for the call, or come back later.

A call over its run's `ModelLimits` must not hold a worker thread while it waits:
a wait of a few hundred milliseconds is slept here (cheaper than a trip through the
broker), anything longer re-queues the hop with a countdown. The re-queued message
keeps its retry count, so waiting never uses up the retries meant for infra failures.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from celery.exceptions import Retry

from megaflow.errors import RateLimitedError
from megaflow.model.base import ModelRequest
from megaflow.ratelimit import Limiter, estimate_tokens, limit_key, make_limiter
from megaflow.runtime import Runtime
from megaflow.spec import RunSpec

log = logging.getLogger(__name__)

#: Waits up to this long in all are slept on the worker thread instead of re-queued.
THREAD_WAIT_BUDGET_S = 0.5
#: Re-queued waits are stretched by up to this fraction, so waiters do not all come back at once.
WAIT_JITTER = 0.25
#: Longest single re-queue (seconds).
MAX_COUNTDOWN_S = 60.0


@dataclass
class Usage:
    """What the call in the `model_slot` block used; set it before the block ends."""

    tokens: float = 0.0


def limiter_for(rt: Runtime) -> Limiter:
    """The worker's limiter, made on first use and kept on its runtime."""
    limiter = getattr(rt, "_megaflow_limiter", None)
    if limiter is None:
        # Two threads racing here make two limiters; one is dropped, which is harmless.
        settings = rt.settings
        limiter = make_limiter(rt.db_url, settings.result_backend)
        rt._megaflow_limiter = limiter
    return limiter


@contextmanager
def model_slot(rt: Runtime, spec: RunSpec, run_id: str, request: ModelRequest) -> Iterator[Usage]:
    """Hold a tier-1 slot while the block calls the model; no-op when the run has no limits.

    Raises:
        RateLimitedError: over a limit for longer than a worker thread should wait.
    """
    usage = Usage()
    limits = spec.model_limits
    if limits is None:
        yield usage
        return
    limiter = limiter_for(rt)
    key = limit_key(limits, run_id, spec.user)
    lease = _acquire(limiter, key, limits, request.request_id, estimate_tokens(request))
    try:
        yield usage
    finally:
        try:
            limiter.release(lease, usage.tokens)
        except Exception:
            # The slot's lease frees it anyway; failing the finished call over it would redo the call.
            log.exception("could not release model slot %s of %s; its lease will free it", lease.holder, key)


def _acquire(limiter: Limiter, key: str, limits, holder: str, tokens: float):
    slept = 0.0
    while True:
        try:
            return limiter.acquire(key, limits, holder, tokens)
        except RateLimitedError as exc:
            if slept + exc.retry_after > THREAD_WAIT_BUDGET_S:
                raise
            time.sleep(exc.retry_after)
            slept += exc.retry_after


def requeue(task, exc: RateLimitedError, waits: int) -> Retry:
    """Send the hop again after `exc.retry_after`, keeping its retry count; return what to raise.

    Like `Task.retry`, the new message keeps the task id, its chain and its chord
    membership, and raising the returned `Retry` acks this delivery.
    """
    # Capped: a message held for its countdown is unacknowledged, and counts against the
    # broker's consumer timeout; a longer wait simply comes round again.
    countdown = min(MAX_COUNTDOWN_S, exc.retry_after) * (1.0 + WAIT_JITTER * random.random())
    request = task.request
    kwargs = {**(request.kwargs or {}), "waits": waits + 1}
    sig = task.signature_from_request(request, None, kwargs, countdown=countdown, retries=request.retries)
    sig.apply_async()
    log.debug("model call %s rate-limited (%d waits so far); again in %.2fs", request.id, waits + 1, countdown)
    return Retry(exc=exc, when=countdown, sig=sig)
