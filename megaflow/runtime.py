"""What a worker process keeps between hops: DB access and cached specs, agents,
model clients and open sandboxes. One per Celery app, created on first use.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from pydantic import TypeAdapter
from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from megaflow.agent import Agent, make_agent
from megaflow.agent.cli import socket_dir
from megaflow.config import Settings
from megaflow.db.engine import session_scope
from megaflow.db.models import Episode, Run, SandboxRow, TaskInstance, utcnow
from megaflow.db.sql import prepared
from megaflow.envs import swe
from megaflow.model.base import ModelClient
from megaflow.model.config import make_client
from megaflow.model.weights import Followers
from megaflow.sandbox.base import Sandbox, SandboxBackend, SandboxConfig
from megaflow.sandbox.pool import SandboxPool
from megaflow.spec import RunSpec, TaskSpec

_task_adapter = TypeAdapter(TaskSpec)
#: Episodes whose refs a worker process keeps (oldest dropped first).
REFS_CACHED = 65536


def _select_refs(conn):
    # Prepared: the first hop of each episode in each worker process misses the cache.
    return select(Episode.run_id, Episode.task_instance_id).where(Episode.id == bindparam("k_id"))


class Runtime:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.db_url = settings.resolved_database_url()
        self._lock = threading.Lock()
        self._models: dict[str, ModelClient] = {}
        self._backends: dict[str, SandboxBackend] = {}
        self._sandboxes: dict[str, Sandbox] = {}
        self._pool: SandboxPool | None = None
        #: Model clients of rl runs, switched to each published policy version.
        self.followers = Followers(self.db_url, self.session)
        # Specs never change after submit, so caching them per process is safe.
        self.spec = lru_cache(maxsize=256)(self._load_spec)
        self.task = lru_cache(maxsize=4096)(self._load_task)
        self.agent = lru_cache(maxsize=256)(self._make_agent)
        self._refs: OrderedDict[str, tuple[str, str]] = OrderedDict()
        #: SQLite has one writer: caches must be filled before a write transaction opens (`warm`).
        self.sqlite = self.db_url.startswith("sqlite")

    @contextmanager
    def session(self, readonly: bool = False) -> Iterator[Session]:
        with session_scope(self.db_url, readonly=readonly) as s:
            yield s

    def _load_spec(self, run_id: str) -> RunSpec:
        with self.session() as s:
            run = s.get(Run, run_id)
            if run is None:
                raise LookupError(f"run {run_id} not found")
            return RunSpec.model_validate(run.spec)

    def refs(self, episode_id: str) -> tuple[str, str]:
        """(run_id, task_instance_id) of an episode: fixed at submit, so cached."""
        hit = self._refs.get(episode_id)
        if hit is not None:
            return hit
        with self.session() as s:
            return self.refs_in(s, episode_id)

    def refs_in(self, session: Session, episode_id: str) -> tuple[str, str]:
        """`refs`, read on a miss in the caller's transaction (no transaction of its own)."""
        hit = self._refs.get(episode_id)
        if hit is None:
            conn = session.connection()
            row = conn.execute(prepared(conn, "runtime.refs", _select_refs), {"k_id": episode_id}).first()
            if row is None:
                raise LookupError(f"episode {episode_id} not found")
            hit = tuple(row)
            with self._lock:
                self._refs[episode_id] = hit
                if len(self._refs) > REFS_CACHED:
                    self._refs.popitem(last=False)
        return hit

    def warm(self, episode_id: str) -> None:
        """On SQLite, load an episode's spec, task and agent before a write transaction opens.

        SQLite allows one writer: a cache miss inside a write transaction would open
        a second transaction in the same thread and wait on itself. Elsewhere a miss
        just reads on another pooled connection, so warming would only add a
        transaction per episode and process.
        """
        if not self.sqlite:
            return
        run_id, ti_id = self.refs(episode_id)
        self.spec(run_id), self.task(ti_id), self.agent(run_id)

    def _load_task(self, task_instance_id: str):
        with self.session() as s:
            ti = s.get(TaskInstance, task_instance_id)
            return _task_adapter.validate_python(ti.data)

    def sandbox_config(self, ep) -> SandboxConfig:
        """The sandbox config of an episode: its run's, with the task's image on docker.

        Here, not in the env hops: admission needs it too (the image it places by).
        """
        spec = self.spec(ep.run_id)
        config = swe.sandbox_config(spec.sandbox, self.task(ep.task_instance_id))
        # Only a CLI agent's sandbox reaches the model proxy; a spec never binds a host directory itself.
        sock = str(socket_dir(self.settings.data_dir)) if spec.agent.type == "cli" else None
        return config if config.model_socket_dir == sock else config.model_copy(update={"model_socket_dir": sock})

    def _make_agent(self, run_id: str) -> Agent:
        return make_agent(self.spec(run_id).agent)

    def model(self, run_id: str) -> ModelClient:
        """The client for a run's model; runs with the same config (and policy they follow) share it."""
        spec = self.spec(run_id)
        policy = spec.rl.policy if spec.rl is not None else None
        key = json.dumps([spec.model.model_dump(mode="json"), policy], sort_keys=True)
        with self._lock:
            client = self._models.get(key)
            if client is None:
                client = make_client(spec.model)
                if policy is not None:
                    self.followers.add(policy, client)
                self._models[key] = client
            return client

    def follow(self, run_id: str) -> int | None:
        """Before a model call: switch the run's client to its policy's newest version if it lags.

        Returns:
            That newest version (0: none published yet), or None for a run without ``rl``.
        """
        spec = self.spec(run_id)
        if spec.rl is None:
            return None
        return self.followers.follow(self.model(run_id), spec.rl.policy)

    def backend(self, kind: str) -> SandboxBackend:
        with self._lock:
            backend = self._backends.get(kind)
            if backend is None:
                from megaflow.sandbox.registry import make_backend

                backend = self._backends[kind] = make_backend(kind, **self._backend_kwargs(kind))
            return backend

    def _backend_kwargs(self, kind: str) -> dict:
        if kind == "local":
            return {"root": self.settings.data_dir}
        if kind == "desktop":  # screenshots: a content-addressed store beside the state
            return {"artifacts_root": self.settings.data_dir / "artifacts"}
        return {}

    def open_sandbox(self, sandbox_id: str, config: SandboxConfig) -> Sandbox:
        """A handle on a sandbox living on this host (attached once, then cached)."""
        with self._lock:
            sb = self._sandboxes.get(sandbox_id)
        if sb is None:
            sb = self.backend(config.type).attach(sandbox_id, config)
            with self._lock:
                self._sandboxes[sandbox_id] = sb
        return sb

    def adopt_sandbox(self, sb: Sandbox) -> None:
        with self._lock:
            self._sandboxes[sb.id] = sb

    def forget_sandbox(self, sandbox_id: str) -> None:
        with self._lock:
            self._sandboxes.pop(sandbox_id, None)

    def pool(self, create: bool = True) -> SandboxPool | None:
        """This process's warm pool of persistent sandboxes (made on first use unless not `create`)."""
        with self._lock:
            if self._pool is None and create:
                self._pool = SandboxPool(self.backend, max_idle=self.settings.sandbox_capacity,
                                         on_destroy=self._mark_destroyed)
            return self._pool

    def _mark_destroyed(self, sandbox_id: str) -> None:
        self.forget_sandbox(sandbox_id)
        with self.session() as s:
            s.execute(update(SandboxRow).where(SandboxRow.id == sandbox_id, SandboxRow.destroyed_at.is_(None))
                      .values(state="destroyed", destroyed_at=utcnow()))

    def close(self) -> None:
        """Close model clients and destroy the pool's idle sandboxes."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        self.followers.close()
        with self._lock:
            for client in self._models.values():
                client.close()
            self._models.clear()
            self._sandboxes.clear()


def get_runtime(app) -> Runtime:
    rt = getattr(app, "_megaflow_runtime", None)
    if rt is None:
        rt = app._megaflow_runtime = Runtime(app.megaflow_settings)
    return rt
