"""The embedded stack: the three worker pools as local processes, no server needed.

Used by ``megaflow run`` / ``megaflow up`` when no broker is configured, and by
tests to start real Celery workers as subprocesses against any broker.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from megaflow.config import Settings
from megaflow.db.schema import upgrade
from queues.topology import POOLS

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment variables that make a child process see `settings`."""
    env = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is not None:
            env[f"MEGAFLOW_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


class WorkerProcess:
    """One `celery worker` subprocess of one pool."""

    def __init__(self, pool: str, settings: Settings, name: str | None = None, extra_env: dict | None = None,
                 extra_args: list[str] | None = None, prefix: list[str] | None = None):
        self.pool, self.settings = pool, settings
        self.name = name or f"{pool}-{os.getpid()}"
        self.extra_env = extra_env or {}
        self.extra_args = extra_args or []
        # A command that execs the worker, e.g. ["ip", "netns", "exec", NS] (tests' separate hosts).
        self.prefix = prefix or []
        self.proc: subprocess.Popen | None = None
        self.log_path = settings.data_dir / "logs" / f"{self.name}.log"

    def start(self) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **settings_env(self.settings), **self.extra_env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        cmd = [*self.prefix, sys.executable, "-m", "celery", "-A", f"workers.{self.pool}", "worker",
               "-n", f"{self.name}@%h", "--loglevel", os.environ.get("MEGAFLOW_LOG_LEVEL", "WARNING"),
               "--without-gossip", "--without-mingle", *self.extra_args]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                         start_new_session=True)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (the main process and its pool children)."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGKILL and self.proc:
            self.proc.wait()

    def stop(self, timeout: float = 15.0) -> None:
        if not self.alive():
            return
        self.kill(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)


def agent_processes(settings: Settings) -> int:
    """How many agent worker processes a one-machine stack runs.

    The agent pool runs threads, and a Python process runs on one core at a time:
    one process per core (``MEGAFLOW_AGENT_PROCESSES`` overrides). One on SQLite,
    which takes one writer at a time.
    """
    if settings.embedded:
        return 1
    return max(1, int(os.environ.get("MEGAFLOW_AGENT_PROCESSES", 0)) or os.cpu_count() or 1)


def stack_workers(settings: Settings, prefix: str, pools: tuple[str, ...] = POOLS) -> list[WorkerProcess]:
    """The worker processes of a one-machine stack (not started): one per pool, the agent's per core."""
    n = {p: agent_processes(settings) if p == "agent" else 1 for p in pools}
    return [WorkerProcess(p, settings, name=f"{prefix}{p}" if n[p] == 1 else f"{prefix}{p}-{i}")
            for p in pools for i in range(n[p])]


class LocalStack:
    """Database schema plus the workers of every pool, stopped on exit."""

    def __init__(self, settings: Settings | None = None, pools: tuple[str, ...] = POOLS):
        self.settings = settings or Settings()
        self.workers = stack_workers(self.settings, "", pools)

    def start(self) -> LocalStack:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(self.settings.resolved_database_url())
        for w in self.workers:
            w.start()
        time.sleep(0.2)
        dead = [w for w in self.workers if not w.alive()]
        if dead:
            raise RuntimeError(f"worker {dead[0].name} exited at start; see {dead[0].log_path}")
        return self

    def check(self) -> None:
        """Raise if a worker died (its log says why)."""
        for w in self.workers:
            if not w.alive():
                raise RuntimeError(f"{w.name} worker exited ({w.proc.returncode}); see {w.log_path}")

    def stop(self) -> None:
        for w in self.workers:
            w.stop()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
