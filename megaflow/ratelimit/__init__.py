"""Tier-1 concurrency control: shared limits on Model Service calls (paper §3).

A run's `ModelLimits` (requests/s, tokens/s, calls in flight) hold across every
model worker at once, so the state lives outside the workers:

* `SQLLimiter` keeps it in the state database (PostgreSQL, or SQLite for the
  embedded stack): one token-bucket row per key, locked while a call is admitted,
  and one leased row per call in flight;
* `RedisLimiter` does the same in two Lua scripts, for deployments whose result
  backend is already Redis (a round trip instead of a transaction).

Both share the bucket arithmetic in `megaflow.ratelimit.base`. A call that is over
a limit gets `RateLimitedError` with the wait computed from the bucket; the model
hop re-queues itself for then instead of holding a thread.
"""

from __future__ import annotations

from megaflow.ratelimit.base import Lease, Limiter, estimate_tokens, limit_key


def make_limiter(db_url: str, result_backend: str | None = None) -> Limiter:
    """The limiter for a worker: Redis when the result backend is Redis, else the state database.

    Args:
        db_url: SQLAlchemy URL of the state database.
        result_backend: Celery result backend URL, if one is configured.
    """
    if result_backend and result_backend.startswith(("redis://", "rediss://")):
        from megaflow.ratelimit.redis_store import RedisLimiter

        return RedisLimiter(result_backend)
    from megaflow.ratelimit.sql import SQLLimiter

    return SQLLimiter(db_url)


__all__ = ["Lease", "Limiter", "estimate_tokens", "limit_key", "make_limiter"]
