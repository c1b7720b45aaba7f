"""Persistent sandboxes: a warm pool per (backend, config) held by one env worker process.

Ephemeral sandboxes are created for one episode and destroyed at its end (perfect
isolation). Persistent ones are reset and reused: `SandboxPool.acquire` hands out an
idle sandbox of the same config when there is one and creates one otherwise;
`SandboxPool.release` resets a sandbox and puts it back, or destroys it when the
reset fails or the pool is full.

The pool only knows sandboxes. What the database says about them (the `sandboxes`
rows, their leases) is the env hops' business; `release` takes a `keep` callback so
that the row can be claimed back as idle before anyone else can acquire the sandbox.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

from megaflow.errors import SandboxError
from megaflow.sandbox.base import Sandbox, SandboxBackend, SandboxConfig

log = logging.getLogger(__name__)

#: Label carrying the pool key on every pooled sandbox.
POOL_LABEL = "megaflow.pool"
#: How long the liveness probe of an idle sandbox may take.
PROBE_TIMEOUT_S = 30.0


def pool_key(config: SandboxConfig) -> str:
    """The pool a config's sandboxes belong to: a hash of every field but `pool_size`."""
    data = config.model_dump(mode="json", exclude={"pool_size"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class SandboxPool:
    """Idle sandboxes by pool key, in least-recently-released order. Thread-safe.

    Args:
        backend_for: Returns the backend of a sandbox type (``Runtime.backend``).
        max_idle: Idle sandboxes kept over all keys; the least recently released go first.
        on_destroy: Called with the id of every sandbox the pool destroys (to mark its row).
    """

    def __init__(self, backend_for: Callable[[str], SandboxBackend], max_idle: int = 64,
                 on_destroy: Callable[[str], None] | None = None):
        self._backend_for = backend_for
        self.max_idle = max_idle
        self._on_destroy = on_destroy
        self._lock = threading.Lock()
        # sandbox id -> (key, type, sandbox); insertion order = release order.
        self._idle: OrderedDict[str, tuple[str, str, Sandbox]] = OrderedDict()
        self._closed = False

    def acquire(self, config: SandboxConfig, labels: dict[str, str]) -> Sandbox:
        """An idle sandbox of `config` (checked alive), or a new one labelled `labels`.

        Idle sandboxes were reset when released, so acquiring one costs a probe only.

        Raises:
            SandboxError: creating a new sandbox failed.
        """
        key = pool_key(config)
        while (sb := self._take(key)) is not None:
            try:
                # The reaper (lease expired) or a crash may have removed it meanwhile.
                if _alive(sb):
                    log.debug("pool %s: reusing sandbox %s", key, sb.id)
                    return sb
            except SandboxError as exc:
                log.info("pool %s: idle sandbox %s is gone (%s)", key, sb.id, exc)
            self._destroy(config.type, sb)
        return self._backend_for(config.type).create(config, {**labels, POOL_LABEL: key})

    def release(self, sandbox: Sandbox, config: SandboxConfig,
                keep: Callable[[Sandbox], bool] | None = None) -> bool:
        """Reset `sandbox` and make it idle; destroy it when that is not possible.

        Args:
            sandbox: A sandbox of `config` that no episode uses any more.
            config: The config it was acquired with.
            keep: Called after the reset, before the sandbox becomes visible to
                `acquire`; returning False destroys it instead (its row was reaped).

        Returns:
            True when the sandbox is idle in the pool, False when it was destroyed.
        """
        key = pool_key(config)
        if config.pool_size <= 0 or self._closed:
            self._destroy(config.type, sandbox)
            return False
        try:
            sandbox.reset()
        except (SandboxError, OSError) as exc:
            log.warning("pool %s: reset of %s failed, destroying it: %s", key, sandbox.id, exc)
            self._destroy(config.type, sandbox)
            return False
        if keep is not None and not keep(sandbox):
            self._destroy(config.type, sandbox)
            return False
        evicted: list[tuple[str, str, Sandbox]] = []
        with self._lock:
            if self._closed or sum(1 for k, _, _ in self._idle.values() if k == key) >= config.pool_size:
                evicted.append((key, config.type, sandbox))
            else:
                self._idle[sandbox.id] = (key, config.type, sandbox)
                while len(self._idle) > self.max_idle:
                    evicted.append(self._idle.popitem(last=False)[1])
        for _, kind, sb in evicted:
            self._destroy(kind, sb)
        return all(sb is not sandbox for _, _, sb in evicted)

    def idle_ids(self) -> list[str]:
        """Ids of the idle sandboxes (their leases are renewed from these)."""
        with self._lock:
            return list(self._idle)

    def discard(self, sandbox_id: str) -> bool:
        """Drop an idle sandbox from the pool without destroying it (someone else does).

        Returns:
            True when it was idle here.
        """
        with self._lock:
            return self._idle.pop(sandbox_id, None) is not None

    def close(self) -> None:
        """Destroy every idle sandbox; later releases destroy theirs. Idempotent."""
        with self._lock:
            self._closed = True
            idle, self._idle = list(self._idle.values()), OrderedDict()
        for _, kind, sb in idle:
            self._destroy(kind, sb)

    def _take(self, key: str) -> Sandbox | None:
        with self._lock:
            # Most recently released first: its pages are the warmest.
            for sandbox_id in reversed(self._idle):
                if self._idle[sandbox_id][0] == key:
                    return self._idle.pop(sandbox_id)[2]
        return None

    def _destroy(self, kind: str, sandbox: Sandbox) -> None:
        try:
            self._backend_for(kind).destroy(sandbox.id)
        except SandboxError:
            log.warning("destroy of pooled sandbox %s failed; the reaper will retry", sandbox.id, exc_info=True)
            return
        if self._on_destroy is not None:
            try:
                self._on_destroy(sandbox.id)
            except Exception:  # bookkeeping only: the reaper settles the row later
                log.warning("recording the destruction of %s failed", sandbox.id, exc_info=True)


def _alive(sb: Sandbox) -> bool:
    """A backend's own cheap liveness probe (Docker: inspect, 2-3 ms) or a `true` exec."""
    probe = getattr(sb, "alive", None)
    if probe is not None:
        return probe()
    return sb.exec("true", timeout=PROBE_TIMEOUT_S).exit_code == 0
