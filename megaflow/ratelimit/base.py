"""The limiter interface and the token-bucket arithmetic every store shares.

Each key (a run, or a user) has two token buckets and a set of leased slots:

* the request bucket holds up to ``max(1, requests_per_s * burst_s)`` and refills at
  `requests_per_s`; a call takes 1;
* the token bucket holds up to ``max(1, tokens_per_s * burst_s)`` and refills at
  `tokens_per_s`; a call reserves its estimated tokens and, when it ends, is charged
  what it really used (the bucket may go below zero: later calls then wait longer);
* a slot per call in flight, leased for `lease_s`, so a worker killed mid-call
  frees its slot when the lease runs out. Slots are named by the hop (episode and
  step), so a redelivered hop takes over its dead predecessor's slot at once.

Over any window of T seconds a key thus starts at most ``capacity + rate * T`` calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from megaflow.model.base import ModelRequest
from megaflow.spec import ModelLimits

#: Bounds on the wait suggested while every in-flight slot is taken (seconds).
MIN_SLOT_WAIT_S, MAX_SLOT_WAIT_S = 0.05, 5.0
#: Weight of the newest call in the running mean of call durations.
LATENCY_ALPHA = 0.2


@dataclass(frozen=True)
class Lease:
    """An admitted call: hand it back to `Limiter.release` when the call ends."""

    key: str
    holder: str
    limits: ModelLimits
    reserved: float
    started: float


class Limiter(Protocol):
    """Shared tier-1 limits. Thread-safe; one per worker process.

    Raises (acquire):
        RateLimitedError: over a limit now; its `retry_after` says when to try again.
    """

    def acquire(self, key: str, limits: ModelLimits, holder: str, tokens: float) -> Lease:
        """Admit one call of about `tokens` tokens for `holder` (a hop's id), or raise."""

    def release(self, lease: Lease, used_tokens: float) -> None:
        """End an admitted call: free its slot, charge its real token usage."""

    def in_flight(self, key: str) -> int:
        """Calls of `key` holding a live slot now."""

    def close(self) -> None:
        """Release connections. Idempotent."""


@dataclass
class Bucket:
    """One key's buckets as stored: tokens left in each, when last refilled, mean call time."""

    requests: float
    tokens: float
    updated: float
    latency_s: float = 1.0


def limit_key(limits: ModelLimits, run_id: str, user: str) -> str:
    """The key whose buckets a call draws from."""
    return f"user:{user}" if limits.scope == "user" else f"run:{run_id}"


def estimate_tokens(request: ModelRequest) -> float:
    """What a call may use before it runs: about 4 characters a prompt token, plus its cap."""
    chars = sum(len(m.content) for m in request.messages)
    return chars / 4.0 + 4 * len(request.messages) + request.sampling.max_tokens


def request_capacity(limits: ModelLimits) -> float:
    return max(1.0, (limits.requests_per_s or 0.0) * limits.burst_s)


def token_capacity(limits: ModelLimits) -> float:
    return max(1.0, (limits.tokens_per_s or 0.0) * limits.burst_s)


def full_bucket(limits: ModelLimits, now: float) -> Bucket:
    return Bucket(requests=request_capacity(limits), tokens=token_capacity(limits), updated=now)


def reservation(limits: ModelLimits, tokens: float) -> float:
    """Tokens a call reserves: capped at the bucket's size, or it could never start."""
    if limits.tokens_per_s is None:
        return 0.0
    return min(max(tokens, 0.0), token_capacity(limits))


def refill(bucket: Bucket, limits: ModelLimits, now: float) -> Bucket:
    elapsed = max(0.0, now - bucket.updated)  # hosts' clocks may step back; buckets never drain from it
    requests, tokens = bucket.requests, bucket.tokens
    if limits.requests_per_s is not None:
        requests = min(request_capacity(limits), requests + elapsed * limits.requests_per_s)
    if limits.tokens_per_s is not None:
        tokens = min(token_capacity(limits), tokens + elapsed * limits.tokens_per_s)
    return Bucket(requests=requests, tokens=tokens, updated=max(now, bucket.updated), latency_s=bucket.latency_s)


def admit(bucket: Bucket, limits: ModelLimits, now: float, in_flight: int, reserved: float) -> tuple[Bucket, float]:
    """Decide one call.

    Args:
        bucket: The key's stored state.
        limits: The limits in force.
        now: The shared clock, in seconds.
        in_flight: Live slots of the key, the caller's own excluded.
        reserved: Tokens the call reserves (see `reservation`).

    Returns:
        The bucket to store, and 0.0 if the call is admitted (the bucket is then
        charged) or else how many seconds to wait before trying again.
    """
    b = refill(bucket, limits, now)
    waits = [0.0]
    if limits.max_in_flight is not None and in_flight >= limits.max_in_flight:
        # When a slot frees is unknown; about one mean call time per slot is a fair guess.
        guess = b.latency_s / limits.max_in_flight
        waits.append(min(MAX_SLOT_WAIT_S, max(MIN_SLOT_WAIT_S, guess)))
    if limits.requests_per_s is not None and b.requests < 1.0:
        waits.append((1.0 - b.requests) / limits.requests_per_s)
    if limits.tokens_per_s is not None and b.tokens < reserved:
        waits.append((reserved - b.tokens) / limits.tokens_per_s)
    wait = max(waits)
    if wait > 0:
        return b, wait
    if limits.requests_per_s is not None:
        b.requests -= 1.0
    b.tokens -= reserved
    return b, 0.0


def settle(bucket: Bucket, limits: ModelLimits, now: float, reserved: float, used: float,
           duration_s: float) -> Bucket:
    """Charge an ended call's real usage in place of its reservation, and time it."""
    b = refill(bucket, limits, now)
    if limits.tokens_per_s is not None:
        b.tokens = min(token_capacity(limits), b.tokens + reserved - used)
    if duration_s > 0 and math.isfinite(duration_s):
        b.latency_s += LATENCY_ALPHA * (duration_s - b.latency_s)
    return b
