"""Tier-1 limits kept in Redis, for deployments whose result backend is Redis.

Per key, a hash holds the buckets and a sorted set the in-flight slots (score: lease
expiry). Admitting a call is an optimistic transaction (WATCH both, read, MULTI,
write, EXEC; again if another worker wrote in between), so the arithmetic is the
very code `SQLLimiter` runs. Redis's own clock (TIME) is the shared clock. Keys
expire a while after their last use, so finished runs leave nothing behind.
"""

from __future__ import annotations

import logging

from megaflow.errors import RateLimitedError
from megaflow.ratelimit.base import Bucket, Lease, admit, full_bucket, reservation, settle
from megaflow.spec import ModelLimits

log = logging.getLogger(__name__)

#: Keys outlive their last use by this long (and at least a lease).
IDLE_TTL_S = 3600
_PREFIX = "megaflow:limits:"


class RedisLimiter:
    """A `Limiter` on Redis.

    Args:
        url: ``redis://host:port/db``.
    """

    def __init__(self, url: str):
        import redis

        self._redis = redis.Redis.from_url(url)
        self._watch_error = redis.WatchError

    def acquire(self, key: str, limits: ModelLimits, holder: str, tokens: float) -> Lease:
        """Admit one call, or raise `RateLimitedError` with the wait.

        Raises:
            RateLimitedError: a limit is reached; `retry_after` seconds from now it may not be.
        """
        reserved = reservation(limits, tokens)
        bucket_key, slots_key = _PREFIX + key, _PREFIX + key + ":slots"
        while True:
            with self._redis.pipeline() as pipe:
                try:
                    pipe.watch(bucket_key, slots_key)
                    now = _now(pipe)
                    bucket = _read(pipe, bucket_key) or full_bucket(limits, now)
                    own = pipe.zscore(slots_key, holder)
                    in_flight = pipe.zcount(slots_key, f"({now}", "+inf") - (1 if own and own > now else 0)
                    bucket, wait = admit(bucket, limits, now, in_flight, reserved)
                    if wait > 0:
                        pipe.unwatch()
                        raise RateLimitedError(f"model limits of {key} reached ({in_flight} in flight)",
                                               retry_after=wait)
                    ttl = int(max(IDLE_TTL_S, limits.lease_s * 2))
                    pipe.multi()
                    _write(pipe, bucket_key, bucket, ttl)
                    # Expired slots belong to dead workers.
                    pipe.zremrangebyscore(slots_key, "-inf", now)
                    pipe.zadd(slots_key, {holder: now + limits.lease_s})
                    pipe.expire(slots_key, ttl)
                    pipe.execute()
                except self._watch_error:
                    continue  # another worker moved the buckets: decide again on fresh state
            return Lease(key=key, holder=holder, limits=limits, reserved=reserved, started=now)

    def release(self, lease: Lease, used_tokens: float) -> None:
        """Free the call's slot and charge its real usage. Safe to call after the lease expired."""
        bucket_key, slots_key = _PREFIX + lease.key, _PREFIX + lease.key + ":slots"
        while True:
            with self._redis.pipeline() as pipe:
                try:
                    pipe.watch(bucket_key)
                    now = _now(pipe)
                    bucket = _read(pipe, bucket_key) or full_bucket(lease.limits, now)
                    bucket = settle(bucket, lease.limits, now, lease.reserved, used_tokens, now - lease.started)
                    pipe.multi()
                    _write(pipe, bucket_key, bucket, int(max(IDLE_TTL_S, lease.limits.lease_s * 2)))
                    pipe.zrem(slots_key, lease.holder)
                    pipe.execute()
                    return
                except self._watch_error:
                    continue

    def in_flight(self, key: str) -> int:
        """Live slots of `key` (for status pages and tests)."""
        seconds, micros = self._redis.time()
        return int(self._redis.zcount(_PREFIX + key + ":slots", f"({seconds + micros / 1e6}", "+inf"))

    def close(self) -> None:
        """Close the connection pool. Idempotent."""
        self._redis.close()


def _now(pipe) -> float:
    seconds, micros = pipe.time()
    return seconds + micros / 1e6


def _read(pipe, bucket_key: str) -> Bucket | None:
    raw = pipe.hgetall(bucket_key)
    if not raw:
        return None
    values = {k.decode(): float(v) for k, v in raw.items()}
    return Bucket(requests=values["requests"], tokens=values["tokens"], updated=values["updated"],
                  latency_s=values["latency_s"])


def _write(pipe, bucket_key: str, b: Bucket, ttl: int) -> None:
    pipe.hset(bucket_key, mapping={"requests": b.requests, "tokens": b.tokens, "updated": b.updated,
                                   "latency_s": b.latency_s})
    pipe.expire(bucket_key, ttl)
