"""Time limits for the threads pools, where Celery enforces none.

Celery's soft and hard time limits work only in its prefork pool; the model,
agent and env pools run threads. Every hop bounds its own waits (command deadlines, HTTP
timeouts, model-call deadlines), so this is the backstop for what slips through:
a task past its soft limit is logged (and a ``task.overrun`` event recorded), and
past its hard limit — which `megaflow.deadlines` keeps below the broker's consumer
timeout — the worker process exits (``Settings.watchdog_exit``). A thread cannot be
killed; exiting lets the broker redeliver the task's message now, and the
delivery limit (`megaflow.delivery`) stops it coming back for ever, instead of
the broker closing the channel at its consumer timeout.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from celery import signals

log = logging.getLogger(__name__)

#: Exit status of a worker that the watchdog stopped (EX_TEMPFAIL: run it again).
EXIT_STATUS = 75


@dataclass
class _Running:
    name: str
    started: float
    soft: float | None
    hard: float | None
    warned: bool = False


class Watchdog(threading.Thread):
    """Watches the tasks of one worker process. A daemon thread.

    Args:
        limits: (soft, hard) seconds per task name; a message's own ``timelimit``
            header, when set, wins.
        exit_on_hard: exit the process when a task passes its hard limit.
        interval_s: how often to look.
        on_overrun: called (task name, task id, seconds, "soft" | "hard") when a limit passes.
    """

    def __init__(self, limits: dict[str, tuple[float, float]], exit_on_hard: bool = True,
                 interval_s: float = 1.0, on_overrun=None):
        super().__init__(name="megaflow-watchdog", daemon=True)
        self.limits, self.exit_on_hard, self.interval_s = limits, exit_on_hard, interval_s
        self.on_overrun = on_overrun
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._stop_event = threading.Event()

    def started(self, task_id: str, name: str, timelimit=None) -> None:
        soft, hard = self.limits.get(name, (None, None))
        if timelimit and any(timelimit):
            hard, soft = timelimit[0] or hard, timelimit[1] or soft
        with self._lock:
            self._running[task_id] = _Running(name, time.monotonic(), soft, hard)

    def finished(self, task_id: str) -> None:
        with self._lock:
            self._running.pop(task_id, None)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.check()

    def check(self, now: float | None = None) -> list[tuple[str, str]]:
        """One look; returns (task id, "soft" | "hard") for each limit found passed."""
        now = time.monotonic() if now is None else now
        passed = []
        with self._lock:
            running = list(self._running.items())
        for task_id, task in running:
            elapsed = now - task.started
            if task.hard is not None and elapsed > task.hard:
                passed.append((task_id, "hard"))
            elif task.soft is not None and elapsed > task.soft and not task.warned:
                task.warned = True
                passed.append((task_id, "soft"))
        for task_id, which in passed:
            task = self._running.get(task_id)
            if task is not None:
                self._overrun(task_id, task, now - task.started, which)
        return passed

    def _overrun(self, task_id: str, task: _Running, elapsed: float, which: str) -> None:
        limit = task.hard if which == "hard" else task.soft
        log.error("task %s[%s] has run %.0fs, past its %s time limit of %.0fs", task.name, task_id, elapsed,
                  which, limit)
        if self.on_overrun is not None:
            try:
                self.on_overrun(task.name, task_id, elapsed, which)
            except Exception:
                log.warning("could not record the overrun", exc_info=True)
        if which == "hard" and self.exit_on_hard:
            log.critical("exiting so that the broker redelivers %s[%s] now (it cannot be stopped in a thread)",
                         task.name, task_id)
            logging.shutdown()
            os._exit(EXIT_STATUS)

    def stop(self) -> None:
        self._stop_event.set()


def install(app, limits: dict[str, tuple[float, float]], exit_on_hard: bool) -> Watchdog:
    """Watch `app`'s tasks in this worker process (call once, before the worker starts)."""
    dog = Watchdog(limits, exit_on_hard=exit_on_hard, on_overrun=_event_recorder(app))

    @signals.task_prerun.connect(weak=False)
    def _started(sender=None, task_id=None, task=None, **kwargs):
        if task is not None and task.app is app:
            dog.started(task_id, task.name, getattr(task.request, "timelimit", None))

    @signals.task_postrun.connect(weak=False)
    def _finished(sender=None, task_id=None, task=None, **kwargs):
        if task is not None and task.app is app:
            dog.finished(task_id)

    @signals.worker_ready.connect(weak=False)
    def _start(sender=None, **kwargs):
        if sender is not None and sender.app is app and not dog.is_alive():
            dog.start()

    @signals.worker_shutdown.connect(weak=False)
    def _stop(sender=None, **kwargs):
        if sender is not None and sender.app is app:
            dog.stop()

    return dog


def _event_recorder(app):
    def record(name: str, task_id: str, elapsed: float, which: str) -> None:
        from megaflow.db.engine import session_scope
        from megaflow.events import emit

        with session_scope(app.megaflow_settings.resolved_database_url()) as s:
            emit(s, "task.overrun", data={"task": name, "task_id": task_id, "elapsed_s": round(elapsed, 1),
                                          "limit": which})
    return record
