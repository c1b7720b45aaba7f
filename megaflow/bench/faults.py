"""Faults for `megaflow bench chaos`: SIGKILLed workers and restarted services.

`Killer` SIGKILLs a random worker (model, agent or env; its whole process group,
pool children included) every ~`interval_s` and starts a fresh one in its place.
`restart_service` runs an operator's restart command for RabbitMQ or PostgreSQL
and waits until the service answers again; when the command cannot run here it
says why instead, and the fault is skipped.
"""

from __future__ import annotations

import logging
import random
import shlex
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from megaflow.local_stack import WorkerProcess

log = logging.getLogger(__name__)

#: Restart commands that work on a Debian machine running the services itself.
DEFAULT_RABBITMQ_RESTART = "rabbitmqctl shutdown && rabbitmq-server -detached"
DEFAULT_POSTGRES_RESTART = ("pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | sort -V | tail -1) "
                            "main restart")


@dataclass
class FaultLog:
    """What was injected, and what was skipped and why."""

    kills: Counter = field(default_factory=Counter)
    #: (wall-clock time, pool) of every SIGKILL, for telling injected failures from self-made ones.
    kill_times: list[tuple[float, str]] = field(default_factory=list)
    restarts: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def injected(self) -> int:
        return sum(self.kills.values()) + sum(1 for r in self.restarts if r["ok"])


def kill_interval(spec: float | str) -> tuple[float, float]:
    """Seconds between two kills, drawn uniformly from the range: ``8`` is 8 s ±30 %, ``"2-5"`` is 2 to 5 s."""
    text = str(spec).strip()
    if "-" in text.lstrip("-"):
        lo, hi = (float(x) for x in text.split("-", 1))
    else:
        lo = hi = float(text)
        lo, hi = lo * 0.7, hi * 1.3
    if not 0 < lo <= hi:
        raise ValueError(f"bad kill interval {spec!r}: want N or LO-HI seconds, 0 < LO <= HI")
    return lo, hi


class Killer(threading.Thread):
    """Every `interval` seconds (drawn uniformly from a range), SIGKILL a random worker and start a new one.

    Args:
        workers: pool name → its current worker; replaced in place on each kill.
        make_worker: builds (not starts) a fresh worker of a pool, given a sequence number.
        interval_s: mean time between kills (±30 %), or a (low, high) range in seconds.
        faults: where kills are counted.
        rng: the random source (seeded by the bench, so a run can be repeated).
    """

    def __init__(self, workers: dict[str, WorkerProcess], make_worker: Callable[[str, int], WorkerProcess],
                 interval_s: float | tuple[float, float], faults: FaultLog, rng: random.Random):
        super().__init__(name="megaflow-chaos-killer", daemon=True)
        self.workers, self.make_worker = workers, make_worker
        self.interval = interval_s if isinstance(interval_s, tuple) else kill_interval(interval_s)
        self.faults, self.rng = faults, rng
        self.lock = threading.Lock()  # held while a worker is swapped (service restarts wait on it)
        self._stop_event = threading.Event()
        self._n = 0

    def run(self) -> None:
        while not self._stop_event.wait(self.rng.uniform(*self.interval)):
            self.kill_one()

    def kill_one(self, pool: str | None = None) -> str:
        with self.lock:
            pool = pool or self.rng.choice(sorted(self.workers))
            victim = self.workers[pool]
            self.faults.kill_times.append((time.time(), pool))
            victim.kill()  # SIGKILL to the process group, then reaped
            self._n += 1
            self.workers[pool] = self.make_worker(pool, self._n).start()
            self.faults.kills[pool] += 1
            log.info("chaos: SIGKILLed %s worker %s (pid %s); started %s", pool, victim.name, victim.pid,
                     self.workers[pool].name)
            return pool

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=60)


def restart_service(name: str, command: str | None, ready: Callable[[], bool], faults: FaultLog,
                    timeout_s: float = 180.0) -> bool:
    """Run `command` to restart service `name`, then wait until `ready()`.

    Returns:
        True when the restart happened and the service answers again. False (with a
        note in `faults`) when there is no command, its program is missing, or it failed.
    """
    if not command:
        faults.notes.append(f"{name} restart skipped: no restart command given")
        return False
    program = shlex.split(command)[0]
    if shutil.which(program) is None:
        faults.notes.append(f"{name} restart skipped: {program!r} is not installed here (pass a restart command)")
        return False
    t0, wall0 = time.monotonic(), time.time()
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-300:]
        faults.notes.append(f"{name} restart skipped: {command!r} exited {proc.returncode}: {tail}")
        # Whatever the command did, the service must come back before the bench goes on.
        _wait(ready, timeout_s)
        faults.restarts.append({"service": name, "ok": False, "seconds": round(time.monotonic() - t0, 1),
                                "start": wall0, "end": time.time()})
        return False
    ok = _wait(ready, timeout_s)
    seconds = round(time.monotonic() - t0, 1)
    faults.restarts.append({"service": name, "ok": ok, "seconds": seconds, "start": wall0, "end": time.time()})
    if not ok:
        faults.notes.append(f"{name} did not answer within {timeout_s:.0f}s of its restart")
    log.info("chaos: restarted %s in %.1fs", name, seconds)
    return ok


def _wait(ready: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ready():
                return True
        except Exception:  # not up yet
            pass
        time.sleep(0.5)
    return False


def amqp_ready(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        from kombu import Connection

        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
            conn.default_channel.queue_declare("agent", passive=True)
        return True
    return ready


def sql_ready(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        from sqlalchemy import create_engine, text

        engine = create_engine(url, pool_pre_ping=True)
        try:
            with engine.connect() as conn:
                conn.execute(text("select 1"))
        finally:
            engine.dispose()
        return True
    return ready


def is_local(url: str) -> bool:
    """True when a service URL points at this machine (so a local restart command restarts it)."""
    from urllib.parse import urlsplit

    host = urlsplit(url.replace("+psycopg2", "")).hostname or "localhost"
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")
