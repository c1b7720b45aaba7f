"""`megaflow bench load`: a run on a saturated machine, with its broker connections watched from outside.

Issue #21 point 3: on a loaded machine the agent pool once stalled for 20 s — RabbitMQ
closed two of a worker's connections for missed heartbeats, then the worker logged
"Couldn't ack … Connection reset by peer" for every hop it held. This bench repeats
the conditions on purpose: CPU burners on every core (`burners`, default one per
core) beside real workers of the three pools (with task events on, as under Flower),
a scripted model and memory sandboxes, so the hops themselves are as dense as they get.

It counts from outside MegaFlow (`megaflow.bench.load_watch`):

* ``missed_heartbeats``: connections of the bench's private vhost that RabbitMQ's
  log says it closed for missed heartbeats (target 0);
* ``ack_errors``: "Couldn't ack" lines in the workers' log files (target 0), beside
  ``worker_critical_lines`` and ``broker_connection_lost``;
* ``max_hop_gap_s``: the longest time, from the submit to the last hop, with no hop
  starting anywhere (against ``heartbeat_s``, the broker heartbeat: a stall as long
  as two of them is what RabbitMQ punishes);
* ``episodes_succeeded`` of ``episodes``; ``cpu_busy_fraction``: the share of the
  machine's CPU that was busy during the run (the floor that shows it was saturated).

With ``dump_stalls_s`` set, every worker's threads are dumped (``py-spy dump``) whenever
no hop has started for that long: the stack of a stalled worker, for the record.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy import func, select

from megaflow.bench import chaos_checks as checks
from megaflow.bench.faults import FaultLog
from megaflow.bench.floors import wait_for_worker
from megaflow.bench.load_watch import (
    RABBITMQ_LOGS,
    LogTail,
    busy_fraction,
    cpu_times,
    longest_gap_s,
    rabbitmq_closures,
    worker_log_counts,
)
from megaflow.bench.pipeline import bench_spec
from megaflow.client import Client
from megaflow.config import Settings
from megaflow.db import states
from megaflow.db.models import Episode, Hop
from megaflow.db.schema import upgrade
from megaflow.local_stack import WorkerProcess, agent_processes, stop_all

_BURN = "while True: pass"


def run_load_bench(episodes: int = 1000, steps: int = 3, burners: int | None = None, timeout_s: float = 3600.0,
                   rabbitmq_logs: str = RABBITMQ_LOGS, dump_stalls_s: float | None = None,
                   broker_url: str | None = None, admin_database_url: str | None = None, keep: bool = False,
                   settle_s: float | None = None) -> dict:
    """Run `episodes` on a machine kept busy by `burners` CPU burners; returns the figures (module docstring).

    `settle_s`: how long after the run to keep watching (default three broker heartbeats:
    RabbitMQ closes a silent connection two to three heartbeats after its last bytes).
    """
    base = Settings()
    broker = broker_url or base.broker_url or "amqp://guest:guest@127.0.0.1:5672//"
    admin = admin_database_url or base.database_url or "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
    if not broker.startswith(("amqp", "pyamqp")) or not admin.startswith("postgresql"):
        raise SystemExit("bench load needs RabbitMQ and PostgreSQL (MEGAFLOW_BROKER_URL, MEGAFLOW_DATABASE_URL)")
    name = f"megaflow_load_{uuid.uuid4().hex[:8]}"
    faults = FaultLog()
    # A private vhost: RabbitMQ's log names each connection's vhost, so only ours count.
    vhost_url, drop_vhost = checks.private_vhost(broker, name, faults)
    db_url, drop_db = checks.private_database(admin, name)
    data_dir = Path(tempfile.mkdtemp(prefix="megaflow-load-"))
    settings = Settings(data_dir=data_dir, broker_url=vhost_url, database_url=db_url, host=f"load-{name[-8:]}")
    try:
        upgrade(db_url)
        figures = _run(settings, episodes, steps, burners if burners is not None else _cores(), timeout_s,
                       LogTail(rabbitmq_logs).start(), dump_stalls_s, settle_s)
    finally:
        if not keep:
            drop_vhost and drop_vhost()
            drop_db()
            shutil.rmtree(data_dir, ignore_errors=True)
    figures["notes"] = faults.notes + figures.get("notes", [])
    if keep:
        figures["data_dir"] = str(data_dir)
    return figures


def _cores() -> int:
    return os.cpu_count() or 1


def _run(settings: Settings, episodes: int, steps: int, burners: int, timeout_s: float, rabbit: LogTail,
         dump_stalls_s: float | None, settle_s: float | None) -> dict:
    client = Client(settings)
    # Task events on (-E), as `megaflow worker` starts them for Flower: a second connection
    # per worker whose heartbeats the consumer loop sends too.
    workers = [WorkerProcess(pool, settings, name=f"load-{pool}-{i}", extra_args=["-E"])
               for pool in ("model", "agent", "env")
               for i in range(agent_processes(settings) if pool == "agent" else 1)]
    burning: list[subprocess.Popen] = []
    watcher = None
    try:
        for w in workers:
            w.start()
        for w in workers:
            wait_for_worker(client.app, w.name, timeout=120)
        burning = [subprocess.Popen([sys.executable, "-c", _BURN]) for _ in range(burners)]
        time.sleep(1.0)  # the burners have the cores before the first message goes out
        cpu0 = cpu_times()
        submitted = time.time()
        t0 = time.monotonic()
        run_id = client.submit(bench_spec(episodes, steps))
        if dump_stalls_s:
            # Outside the data directory, which goes with the run: the dumps are the point.
            watcher = StallDumper(client, run_id, workers, dump_stalls_s,
                                  Path(tempfile.mkdtemp(prefix="megaflow-load-stalls-")))
            watcher.start()
        st = client.wait(run_id, timeout=timeout_s, poll=1.0)
        elapsed = time.monotonic() - t0
        cpu1 = cpu_times()
        # Heartbeat trouble shows up to ~3 heartbeat intervals after it began: wait that out before reading the logs.
        time.sleep(3 * float(client.app.conf.broker_heartbeat or 0) if settle_s is None else settle_s)
        # Read before the workers stop: their exit drops pooled connections without a close.
        broker_log = rabbit.lines()
    finally:
        if watcher:
            watcher.stop()
        for b in burning:
            b.send_signal(signal.SIGKILL)
            b.wait()
        stop_all(workers)
    starts = hop_starts(client, run_id)
    # kombu writes the default vhost "/" as a trailing "//".
    closures = rabbitmq_closures(broker_log, urlsplit(settings.broker_url).path[1:] or "/")
    figures = {
        "episodes": episodes,
        "episodes_succeeded": st["by_state"].get("succeeded", 0),
        "missed_heartbeats": closures["missed_heartbeats"],
        **worker_log_counts(settings.data_dir / "logs"),
        "max_hop_gap_s": round(longest_gap_s(starts, since=submitted), 2),
        "heartbeat_s": client.app.conf.broker_heartbeat,
        "hops": len(starts),
        "elapsed_s": round(elapsed, 1),
        "hops_per_s": round(len(starts) / elapsed, 1) if elapsed else 0.0,
        "burners": burners,
        "cpu_busy_fraction": round(busy_fraction(cpu0, cpu1), 3),
        "broker_connections": closures["connections"],
        # Connections the broker saw dropped without a close while the run went on (a worker died, a reset).
        "broker_connections_closed_abruptly": closures["closed_abruptly"],
        "workers": len(workers),
        "notes": [],
    }
    if not rabbit.readable():
        figures["missed_heartbeats"] = None
        figures["notes"].append(f"RabbitMQ's log ({rabbit.pattern}) is not readable here: missed_heartbeats unknown")
    if watcher:
        figures["stall_dumps"] = watcher.dumps
    figures["targets"] = targets(figures)
    return figures


def targets(f: dict) -> dict:
    """Which targets the run met; the saturation one says whether the run proves anything."""
    return {
        "no_missed_heartbeats": f["missed_heartbeats"] == 0,
        "no_ack_errors": f["ack_errors"] == 0 and f["worker_critical_lines"] == 0,
        "all_succeeded": f["episodes_succeeded"] == f["episodes"],
        "no_stall": f["max_hop_gap_s"] < (f["heartbeat_s"] or 10),
        "machine_saturated": f["cpu_busy_fraction"] >= 0.9,
    }


def hop_starts(client: Client, run_id: str) -> list[float]:
    """Unix start times of every hop of the run's episodes (the database's clock, as the hops wrote it)."""
    with client.session() as s:
        ids = select(Episode.id).where(Episode.run_id == run_id)
        rows = s.execute(select(Hop.started_at).where(Hop.subject_id.in_(ids))).scalars().all()
    return [_unix(t) for t in rows]


def _unix(t: dt.datetime) -> float:
    return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp()


class StallDumper(threading.Thread):
    """Dumps every worker's threads with ``py-spy dump`` when no hop has started for `after_s`."""

    def __init__(self, client: Client, run_id: str, workers: list[WorkerProcess], after_s: float, out: Path):
        super().__init__(daemon=True, name="stall-dumper")
        self.client, self.run_id, self.workers, self.after_s, self.out = client, run_id, workers, after_s, out
        self.dumps: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        last_dump = 0.0
        while not self._stop_event.wait(1.0):
            with self.client.session() as s:
                ids = select(Episode.id).where(Episode.run_id == self.run_id)
                latest = s.execute(select(func.max(Hop.started_at)).where(Hop.subject_id.in_(ids))).scalar()
                # Once every episode has ended, a quiet broker is the run closing, not a stall.
                open_episodes = s.execute(select(func.count()).select_from(Episode).where(
                    Episode.run_id == self.run_id, Episode.state.not_in(states.TERMINAL))).scalar()
            if (latest is None or not open_episodes or time.time() - _unix(latest) < self.after_s
                    or time.time() - last_dump < self.after_s):
                continue
            last_dump = time.time()
            self.out.mkdir(parents=True, exist_ok=True)
            path = self.out / f"stall-{int(last_dump)}.txt"
            with open(path, "w") as fh:
                for w in self.workers:
                    fh.write(f"=== {w.name} pid {w.pid}\n")
                    fh.flush()
                    subprocess.run([py_spy, "dump", "--pid", str(w.pid)], stdout=fh, stderr=subprocess.STDOUT,
                                   timeout=60, check=False)
            self.dumps.append(str(path))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=90)
