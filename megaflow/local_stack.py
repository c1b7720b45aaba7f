"""The embedded stack: the three worker pools as local processes, no server needed.

Used by ``megaflow run`` / ``megaflow up`` when no broker is configured, and by
tests to start real Celery workers as subprocesses against any broker.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from megaflow.config import Settings
from megaflow.db.schema import upgrade
from megaflow.kombu_sqlite import restore_unacked
from queues.topology import POOLS

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
#: Signals on which a stack stops its workers (Ctrl-C, `kill`, a closed terminal).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


class Stopped(KeyboardInterrupt):
    """Raised in the main thread when a stop signal arrives, so every ``with`` block unwinds.

    A KeyboardInterrupt, so that code written for Ctrl-C handles SIGTERM and SIGHUP alike.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies, however it dies (even SIGKILL)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment variables that make a child process see `settings` (`Settings.env`)."""
    return settings.env()


class WorkerProcess:
    """One `celery worker` subprocess of one pool."""

    def __init__(self, pool: str, settings: Settings, name: str | None = None, extra_env: dict | None = None,
                 extra_args: list[str] | None = None, prefix: list[str] | None = None,
                 die_with_parent: bool = False):
        self.pool, self.settings = pool, settings
        # Linux ties the parent-death signal to the thread that forks: only safe from one that lives on.
        self.die_with_parent = die_with_parent
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
               "-n", f"{self.name}@%h", "--loglevel", self.settings.log_level,
               "--without-gossip", "--without-mingle", *self.extra_args]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                         start_new_session=True,
                                         preexec_fn=_die_with_parent if self.die_with_parent else None)
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
        stop_all([self], timeout)

    def last_line(self) -> str:
        """The last non-empty line of the worker's log (why it exited, when it did)."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - 4096))
                lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1] if lines else ""


def stop_all(workers: list[WorkerProcess], timeout: float = 15.0) -> None:
    """SIGTERM every worker at once, wait up to `timeout` in all, then SIGKILL what is left.

    All are signalled before any wait, so an interruption while waiting (a second
    Ctrl-C) still leaves every worker stopping; it kills them at once.
    """
    live = [w for w in workers if w.alive()]
    for w in live:
        w.kill(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    try:
        for w in live:
            try:
                w.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.kill(signal.SIGKILL)
    except BaseException:
        for w in live:
            w.kill(signal.SIGKILL)
        raise


def agent_processes(settings: Settings) -> int:
    """How many agent worker processes a one-machine stack runs.

    The agent pool runs threads, and a Python process runs on one core at a time:
    one process per core (``Settings.agent_processes`` overrides). One on SQLite,
    which takes one writer at a time.
    """
    if settings.embedded:
        return 1
    return max(1, settings.agent_processes or os.cpu_count() or 1)


def stack_workers(settings: Settings, prefix: str, pools: tuple[str, ...] = POOLS,
                  die_with_parent: bool = False) -> list[WorkerProcess]:
    """The worker processes of a one-machine stack (not started): one per pool, the agent's per core."""
    n = {p: agent_processes(settings) if p == "agent" else 1 for p in pools}
    return [WorkerProcess(p, settings, name=f"{prefix}{p}" if n[p] == 1 else f"{prefix}{p}-{i}",
                          die_with_parent=die_with_parent)
            for p in pools for i in range(n[p])]


class LocalStack:
    """Database schema plus the workers of every pool, stopped on exit.

    Used as a context manager in the main thread, it also stops its workers on
    SIGINT, SIGTERM and SIGHUP (`Stopped` unwinds the ``with`` block), and its
    workers get SIGTERM if this process dies without unwinding (SIGKILL). On
    start it lists the runs an earlier stack left unfinished (`unfinished`).
    """

    def __init__(self, settings: Settings | None = None, pools: tuple[str, ...] = POOLS):
        self.settings = settings or Settings()
        in_main = threading.current_thread() is threading.main_thread()
        self.workers = stack_workers(self.settings, "", pools, die_with_parent=in_main)
        self.unfinished: list[dict] = []
        self.restored = 0  # messages of an earlier stack delivered again (embedded transport)
        self._handlers: dict[int, object] = {}
        self._pid_file = self.settings.data_dir / "stacks" / f"{os.getpid()}.pid"

    def start(self) -> LocalStack:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(self.settings.resolved_database_url())
        if self.settings.embedded and not self._others_alive():
            # No other stack on this directory: messages the earlier stack's workers took
            # and never acknowledged have no consumer left; they are delivered again
            # (flagged redelivered, so the ledger and the delivery limit see them).
            self.restored = restore_unacked(self.settings.resolved_broker_url())
            self.unfinished = unfinished_runs(self.settings.resolved_database_url())
        self._pid_file.parent.mkdir(exist_ok=True)
        self._pid_file.write_text(str(os.getpid()))
        for w in self.workers:
            w.start()
        time.sleep(0.2)
        self.check()
        return self

    def _others_alive(self) -> bool:
        """Whether another live process runs a stack on this data directory (stale pid files go)."""
        alive = False
        for path in (self.settings.data_dir / "stacks").glob("*.pid"):
            try:
                pid = int(path.stem)
                os.kill(pid, 0)
                alive = alive or pid != os.getpid()
            except (ValueError, ProcessLookupError):
                path.unlink(missing_ok=True)
            except PermissionError:
                alive = True
        return alive

    def check(self) -> None:
        """Raise if a worker died, with the last line of its log (a failed start check says why there)."""
        for w in self.workers:
            if not w.alive():
                raise RuntimeError(f"{w.name} worker exited ({w.proc.returncode}): {w.last_line()[:300]} "
                                   f"(log: {w.log_path})")

    def stop(self) -> None:
        stop_all(self.workers)
        self._pid_file.unlink(missing_ok=True)

    def _on_signal(self, signum, frame) -> None:
        # Later signals while stopping are ignored: the workers already got SIGTERM.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(signum)

    def __enter__(self) -> LocalStack:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            return self.start()
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            for sig, handler in self._handlers.items():
                signal.signal(sig, handler)
            self._handlers.clear()


def unfinished_runs(db_url: str) -> list[dict]:
    """Runs still submitted or running: `id`, `name`, `episodes`, `ended` (episodes that ended)."""
    from sqlalchemy import func, select

    from megaflow.db import states
    from megaflow.db.engine import session_scope
    from megaflow.db.models import Episode, Run

    with session_scope(db_url) as s:
        runs = s.execute(select(Run.id, Run.name, Run.n_episodes).where(Run.status.in_(("submitted", "running")))
                         .order_by(Run.created_at)).all()
        out = []
        for run_id, name, n in runs:
            ended = s.execute(select(func.count()).where(Episode.run_id == run_id, Episode.superseded_by.is_(None),
                                                         Episode.state.in_(states.TERMINAL))).scalar()
            out.append({"id": run_id, "name": name, "episodes": n, "ended": ended})
        return out
