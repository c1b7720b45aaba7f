"""The warm pool of persistent sandboxes, on the in-memory backend (no services needed)."""

from __future__ import annotations

from megaflow.sandbox.base import SandboxConfig
from megaflow.sandbox.memory import MemoryBackend
from megaflow.sandbox.pool import POOL_LABEL, SandboxPool, pool_key


def make_pool(max_idle: int = 64):
    backend = MemoryBackend()
    destroyed: list[str] = []
    pool = SandboxPool(lambda kind: backend, max_idle=max_idle, on_destroy=destroyed.append)
    return pool, backend, destroyed


def config(**kw) -> SandboxConfig:
    return SandboxConfig(type="memory", mode="persistent", **kw)


def test_release_resets_and_acquire_reuses():
    pool, backend, _ = make_pool()
    sb = pool.acquire(config(), {"megaflow.host": "h"})
    assert backend.store[sb.id].labels[POOL_LABEL] == pool_key(config())
    sb.write_file("left.txt", b"by the last episode")
    assert pool.release(sb, config())
    again = pool.acquire(config(), {"megaflow.host": "h"})
    assert again.id == sb.id
    assert again.exec("cat left.txt").exit_code != 0, "an idle sandbox must come back reset"


def test_configs_do_not_share_sandboxes_but_pool_size_is_not_part_of_the_key():
    pool, _, _ = make_pool()
    sb = pool.acquire(config(), {})
    pool.release(sb, config())
    assert pool.acquire(config(memory_mb=512), {}).id != sb.id
    assert pool_key(config(pool_size=1)) == pool_key(config(pool_size=5))
    assert pool.acquire(config(pool_size=1), {}).id == sb.id


def test_full_pool_destroys_what_comes_back():
    pool, backend, destroyed = make_pool()
    cfg = config(pool_size=2)
    sandboxes = [pool.acquire(cfg, {}) for _ in range(3)]
    kept = [pool.release(sb, cfg) for sb in sandboxes]
    assert kept == [True, True, False]
    assert destroyed == [sandboxes[2].id] and sandboxes[2].id not in backend.store
    assert sorted(pool.idle_ids()) == sorted(sb.id for sb in sandboxes[:2])


def test_pool_size_zero_never_keeps():
    pool, backend, destroyed = make_pool()
    sb = pool.acquire(config(pool_size=0), {})
    assert not pool.release(sb, config(pool_size=0))
    assert destroyed == [sb.id] and not backend.store


def test_keep_refusing_destroys_instead():
    pool, _, destroyed = make_pool()
    sb = pool.acquire(config(), {})
    assert not pool.release(sb, config(), keep=lambda _sb: False)
    assert destroyed == [sb.id] and pool.idle_ids() == []


def test_failed_reset_destroys():
    pool, backend, destroyed = make_pool()
    sb = pool.acquire(config(), {})
    backend.store.pop(sb.id)  # gone behind the pool's back: reset raises SandboxNotFoundError
    assert not pool.release(sb, config())
    assert destroyed == [sb.id]


def test_vanished_idle_sandbox_is_replaced_on_acquire():
    pool, backend, destroyed = make_pool()
    sb = pool.acquire(config(), {})
    pool.release(sb, config())
    backend.store.pop(sb.id)  # a reaper took it while idle
    fresh = pool.acquire(config(), {})
    assert fresh.id != sb.id and destroyed == [sb.id]


def test_max_idle_evicts_least_recently_released():
    pool, _, destroyed = make_pool(max_idle=2)
    a, b, c = (pool.acquire(config(memory_mb=mb), {}) for mb in (100, 200, 300))
    for sb, mb in ((a, 100), (b, 200), (c, 300)):
        pool.release(sb, config(memory_mb=mb))
    assert destroyed == [a.id] and sorted(pool.idle_ids()) == sorted([b.id, c.id])


def test_discard_and_close():
    pool, backend, destroyed = make_pool()
    a, b = pool.acquire(config(), {}), pool.acquire(config(), {})
    pool.release(a, config())
    pool.release(b, config())
    assert pool.discard(a.id) and not pool.discard(a.id)
    assert a.id in backend.store, "discard leaves destruction to whoever took it"
    pool.close()
    assert destroyed == [b.id] and b.id not in backend.store
    c = pool.acquire(config(), {})
    assert not pool.release(c, config()), "a closed pool keeps nothing"
