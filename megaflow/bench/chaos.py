"""`megaflow bench chaos`: a run under fire — workers SIGKILLed, RabbitMQ and PostgreSQL restarted.

One run of `episodes` episodes (scripted model, real sandboxes) goes through three
real worker pools while `megaflow.bench.faults.Killer` SIGKILLs a random worker
every ~`kill_every_s` seconds and starts a new one, and RabbitMQ then PostgreSQL
are restarted once each (at about a third and two thirds of the episodes). Then:

* ``episodes_lost``: episodes not in a terminal state when the run should long be
  over (or the run never closed its chords);
* ``duplicate_steps``: commands that ran more than once, seen from *inside* the
  sandbox: every command appends its step to a trace file and prints the line
  count, so a second run of a command shows in the counts and in the final check;
* ``leaked_sandboxes``: sandboxes still alive (rows or directories) after the
  workers stopped and ``megaflow cleanup`` ran; ``sandboxes_reaped_by_cleanup``
  says how many that cleanup had to remove;
* ``infra_failed``: episodes that ended for the platform's reasons (a worker died
  mid-command); ``megaflow resume`` then re-runs them (``infra_failed_after_resume``).
* ``bad_inputs_tried``: invalid specs submitted (all must be refused) and malformed
  messages published on every queue (all must end in ``megaflow.dead``, and the
  pickled one that would run a command must never be unpickled), during the run.

The bench uses a private RabbitMQ vhost and a private PostgreSQL database (created
and dropped here when ``rabbitmqctl`` and the admin URL allow), so nothing else on
the broker is disturbed by its workers — only by the service restarts themselves.
"""

from __future__ import annotations

import logging
import random
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from megaflow.bench import badinput
from megaflow.bench.floors import wait_for_worker
from megaflow.bench.faults import (
    DEFAULT_POSTGRES_RESTART,
    DEFAULT_RABBITMQ_RESTART,
    FaultLog,
    Killer,
    amqp_ready,
    is_local,
    restart_service,
    sql_ready,
)
from megaflow.client import Client
from megaflow.config import Settings
from megaflow.db import states
from megaflow.db.models import Delivery, Episode, Event, SandboxRow, Step
from megaflow.db.schema import upgrade
from megaflow.hops.exec_journal import LOST_OUTPUT
from megaflow.local_stack import WorkerProcess

log = logging.getLogger(__name__)

HOST = "chaos-host"
COMMAND = "echo {step} >> trace.txt && wc -l < trace.txt"


def chaos_spec(episodes: int, steps: int = 3, rollouts: int = 4, sandbox: str = "local",
               latency_s: float = 0.05) -> dict:
    """Episodes whose every command leaves a trace that shows a second execution."""
    rollouts = rollouts if episodes % rollouts == 0 else 1
    expected = " ".join(str(i) for i in range(steps)) + " "
    return {
        "name": "bench-chaos",
        "rollouts": rollouts,
        "model": {"type": "scripted", "replies": [f"```bash\n{COMMAND}\n```"] * steps + ["```bash\nsubmit\n```"],
                  "latency_s": latency_s},
        "sandbox": {"type": sandbox},
        "limits": {"max_steps": steps + 2, "exec_timeout_s": 60, "provision_timeout_s": 120},
        "tasks": [{"instance_id": f"c{i}", "instruction": "append your step to trace.txt",
                   "check": f"test \"$(tr '\\n' ' ' < trace.txt)\" = \"{expected}\""}
                  for i in range(episodes // rollouts)],
    }


def run_chaos_bench(episodes: int = 500, kill_every_s: float = 10.0, sandbox: str = "local",
                    rabbitmq_restart: str | None = DEFAULT_RABBITMQ_RESTART,
                    postgres_restart: str | None = DEFAULT_POSTGRES_RESTART,
                    timeout_s: float = 3600.0, resume: bool = True, seed: int | None = None,
                    broker_url: str | None = None, database_url: str | None = None,
                    admin_database_url: str | None = None, keep: bool = False,
                    private_services: bool = False, private_vhost: bool = True) -> dict:
    """Run the chaos benchmark; returns its figures (see the module docstring).

    With `private_services`, RabbitMQ and PostgreSQL are a node and a server of the
    bench's own (`megaflow.bench.services`), and the default restart commands restart those.
    """
    if private_services:
        from megaflow.bench.services import PrivateServices

        with PrivateServices() as svc:
            if rabbitmq_restart == DEFAULT_RABBITMQ_RESTART:
                rabbitmq_restart = svc.rabbitmq.restart_command
            if postgres_restart == DEFAULT_POSTGRES_RESTART:
                postgres_restart = svc.postgres.restart_command
            figures = run_chaos_bench(episodes, kill_every_s, sandbox, rabbitmq_restart, postgres_restart, timeout_s,
                                      resume, seed, svc.rabbitmq.url, None, svc.postgres.url, keep,
                                      private_vhost=False)
            figures["private_services"] = True
            return figures
    seed = seed if seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    base = Settings()
    broker = broker_url or base.broker_url or "amqp://guest:guest@127.0.0.1:5672//"
    admin = admin_database_url or database_url or base.database_url or "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
    if not broker.startswith(("amqp", "pyamqp")) or not admin.startswith("postgresql"):
        raise SystemExit("bench chaos needs RabbitMQ and PostgreSQL (MEGAFLOW_BROKER_URL, MEGAFLOW_DATABASE_URL)")
    faults = FaultLog()
    name = f"megaflow_chaos_{uuid.uuid4().hex[:8]}"
    vhost_url, drop_vhost = _private_vhost(broker, name, faults) if private_vhost else (broker, None)
    db_url, drop_db = (database_url, None) if database_url else _private_database(admin, name)
    data_dir = Path(tempfile.mkdtemp(prefix="megaflow-chaos-"))
    settings = Settings(data_dir=data_dir, broker_url=vhost_url, database_url=db_url, host=HOST)
    for label, cmd, url in (("rabbitmq", rabbitmq_restart, broker), ("postgres", postgres_restart, db_url)):
        if cmd in (DEFAULT_RABBITMQ_RESTART, DEFAULT_POSTGRES_RESTART) and not is_local(url):
            faults.notes.append(f"{label} is not on this machine: its default restart command would restart "
                                "the wrong server; pass one")
    try:
        upgrade(db_url)
        figures = _run(settings, episodes, kill_every_s, sandbox, rabbitmq_restart, postgres_restart, timeout_s,
                       resume, rng, faults)
    finally:
        if not keep:
            drop_vhost and drop_vhost()
            drop_db and drop_db()
            shutil.rmtree(data_dir, ignore_errors=True)
    figures.update(seed=seed, kill_every_s=kill_every_s, sandbox=sandbox, notes=faults.notes)
    return figures


def _run(settings: Settings, episodes: int, kill_every_s: float, sandbox: str, rabbitmq_restart, postgres_restart,
         timeout_s: float, resume: bool, rng: random.Random, faults: FaultLog) -> dict:
    client = Client(settings)

    def make_worker(pool: str, n: int) -> WorkerProcess:
        return WorkerProcess(pool, settings, name=f"chaos-{pool}-{n}")

    workers = {pool: make_worker(pool, 0).start() for pool in ("model", "agent", "env")}
    killer = Killer(workers, make_worker, kill_every_s, faults, rng)
    try:
        return _drive(client, settings, workers, killer, episodes, sandbox, rabbitmq_restart, postgres_restart,
                      timeout_s, resume, faults)
    finally:
        killer.stop()
        for w in workers.values():
            w.stop()


def _drive(client: Client, settings: Settings, workers: dict, killer: Killer, episodes: int, sandbox: str,
           rabbitmq_restart, postgres_restart, timeout_s: float, resume: bool, faults: FaultLog) -> dict:
    skip = {n.split(" ", 1)[0] for n in faults.notes}
    pending_restarts = [(0.3, "rabbitmq", rabbitmq_restart, amqp_ready(settings.broker_url)),
                        (0.6, "postgres", postgres_restart, sql_ready(settings.database_url))]
    for _, label, cmd, _ in pending_restarts:
        if not cmd:
            faults.notes.append(f"{label} restart skipped: no restart command given")
    pending_restarts = [r for r in pending_restarts if r[1] not in skip and r[2]]
    for w in workers.values():  # their queues (and megaflow.dead) are declared before anything is sent
        wait_for_worker(client.app, w.name)
    t0 = time.monotonic()
    run_id = client.submit(chaos_spec(episodes, sandbox=sandbox))
    killer.start()
    # Bad input alongside: specs that must be refused, raw messages that must be dead-lettered.
    refused = badinput.refuse_all(client)
    marker = settings.data_dir / "pickle-was-unpickled"
    malformed = badinput.malformed_messages(client.app, settings.host, marker)
    badinput.publish(settings.broker_url, malformed)
    deadline = t0 + timeout_s
    st = None
    last_log = t0
    try:
        while time.monotonic() < deadline:
            st = _status(client, run_id) or st
            if st is not None and st["status"] == "finished":
                break
            ended = sum(n for s, n in (st or {"by_state": {}})["by_state"].items() if s in states.TERMINAL)
            if time.monotonic() - last_log > 10:
                last_log = time.monotonic()
                log.info("chaos: %.0fs, %d of %d episodes ended, %s", last_log - t0, ended, episodes,
                         (st or {}).get("by_state"))
            if pending_restarts and ended >= pending_restarts[0][0] * episodes:
                _, label, cmd, ready = pending_restarts.pop(0)
                with killer.lock:  # no worker swap in the middle of a service restart
                    restart_service(label, cmd, ready, faults)
                continue
            time.sleep(0.5)
    finally:
        killer.stop()
    elapsed = time.monotonic() - t0
    for _, label, _, _ in pending_restarts:
        faults.notes.append(f"{label} restart not done: the run ended before its turn")
    figures = _outcome(client, run_id, episodes, elapsed)
    dead = _dead_letters(client.app, len(malformed))
    figures.update(bad_inputs_tried=len(badinput.BAD_SPECS) + len(malformed), bad_specs_refused=refused,
                   malformed_messages_dead_lettered=len(dead), pickle_unpickled=marker.exists())
    figures["faults_injected"] = faults.injected
    figures["kills"] = dict(faults.kills)
    figures["service_restarts"] = faults.restarts
    if resume and figures["infra_failed"] and figures["episodes_lost"] == 0:
        figures.update(_resume(client, run_id))
    for w in workers.values():
        w.stop()
    figures.update(_leaks(settings, client, run_id))
    return figures


def _dead_letters(app, expected: int, timeout_s: float = 60.0) -> list[str]:
    """The messages dead-lettered by now (waiting a little for the last of `expected`)."""
    deadline = time.monotonic() + timeout_s
    with app.connection_for_write() as conn:
        while conn.default_channel.queue_declare("megaflow.dead", passive=True)[1] < expected:
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
    return badinput.dead_letters(app)


def _status(client: Client, run_id: str) -> dict | None:
    try:
        return client.status(run_id)
    except DBAPIError:  # the database is restarting
        return None


def _outcome(client: Client, run_id: str, episodes: int, elapsed: float) -> dict:
    with client.session() as s:
        current = s.execute(select(Episode).where(Episode.run_id == run_id, Episode.superseded_by.is_(None))
                            ).scalars().all()
        steps = s.execute(select(Step.episode_id, Step.index, Step.action, Step.observation).join(
            Episode, Episode.id == Step.episode_id).where(Episode.run_id == run_id)).all()
        redeliveries = s.execute(select(func.count()).select_from(Delivery)).scalar()
        poison = s.execute(select(func.count()).select_from(Event).where(Event.kind == "task.poison")).scalar()
        lost_outputs = s.execute(select(func.count()).select_from(Step).join(Episode, Episode.id == Step.episode_id)
                                 .where(Episode.run_id == run_id, Step.observation == LOST_OUTPUT)).scalar()
        run_status = client.status(run_id)
    by_ep: dict[str, list] = {}
    for eid, index, action, obs in steps:
        by_ep.setdefault(eid, []).append((index, action, obs))
    duplicates = wrong = 0
    for ep in current:
        excess = _excess_runs(by_ep.get(ep.id, []))
        duplicates += excess
        if ep.state == states.SUCCEEDED and ep.reward != 1.0:
            wrong += 1
            duplicates += 0 if excess else 1  # the trace check failed on a command seen only there
    by_state: dict[str, int] = {}
    for ep in current:
        by_state[ep.state] = by_state.get(ep.state, 0) + 1
    lost = sum(n for st, n in by_state.items() if st not in states.TERMINAL)
    exits: dict[str, int] = {}
    errors: list[str] = []
    for ep in current:
        if ep.state == states.INFRA_FAILED:
            exits[ep.exit_status or "?"] = exits.get(ep.exit_status or "?", 0) + 1
            errors.append(f"{ep.exit_status}: {(ep.error or '')[:200]}")
    return {
        "episodes": len(current), "episodes_lost": lost if len(current) == episodes else episodes - len(current) + lost,
        "duplicate_steps": duplicates, "wrong_rewards": wrong, "infra_failed": by_state.get(states.INFRA_FAILED, 0),
        "infra_failed_by_exit": exits, "infra_failed_errors": errors[:5], "by_state": by_state, "run_finished": run_status["status"] == "finished",
        "all_terminal": lost == 0, "elapsed_s": round(elapsed, 1), "redelivered_messages": redeliveries,
        "poison_messages": poison, "exec_outputs_lost": lost_outputs,
    }


def _excess_runs(steps: list) -> int:
    """How many times commands ran beyond once, from the line counts they printed."""
    excess = 0
    for index, action, obs in steps:
        if not action or action == "submit" or obs is None:
            continue
        try:
            excess = max(excess, int(obs.strip().splitlines()[-1]) - (index + 1))
        except (ValueError, IndexError):
            continue
    return max(excess, 0)


def _resume(client: Client, run_id: str) -> dict:
    report = client.resume(run_id)
    try:
        st = client.wait(run_id, timeout=900, poll=0.5)
    except TimeoutError:
        st = client.status(run_id)
    return {"resumed": report["rerun"], "infra_failed_after_resume": st["by_state"].get(states.INFRA_FAILED, 0),
            "by_state_after_resume": st["by_state"], "run_finished_after_resume": st["status"] == "finished"}


def _leaks(settings: Settings, client: Client, run_id: str) -> dict:
    """Sandboxes left after the workers stopped and a cleanup ran (rows, directories, processes)."""
    from megaflow.reaper import reap

    report = reap(settings, all_hosts=True, grace_s=0)
    with client.session() as s:
        rows = s.execute(select(func.count()).select_from(SandboxRow).where(SandboxRow.destroyed_at.is_(None))
                         ).scalar()
    dirs = len(list((settings.data_dir / "sandboxes").glob("mf-*")))
    procs = subprocess.run(["pgrep", "-f", str(settings.data_dir / "sandboxes")], capture_output=True, text=True)
    processes = len(procs.stdout.split())
    return {"leaked_sandboxes": max(rows, dirs) + processes, "leaked_rows": rows, "leaked_dirs": dirs,
            "leaked_processes": processes, "sandboxes_reaped_by_cleanup": len(report["destroyed"]),
            "cleanup_errors": report["errors"][:5]}


def _private_vhost(broker: str, name: str, faults: FaultLog):
    ctl = shutil.which("rabbitmqctl")
    parts = urlsplit(broker)
    if ctl is None or not is_local(broker):
        faults.notes.append("no private vhost (rabbitmqctl not here): the bench shares the broker's vhost")
        return broker, None
    user = parts.username or "guest"
    subprocess.run([ctl, "add_vhost", name], check=True, capture_output=True)
    subprocess.run([ctl, "set_permissions", "-p", name, user, ".*", ".*", ".*"], check=True, capture_output=True)
    url = urlunsplit((parts.scheme, parts.netloc, "/" + name, "", ""))
    return url, lambda: subprocess.run([ctl, "delete_vhost", name], capture_output=True)


def _private_database(admin_url: str, name: str):
    from sqlalchemy import create_engine, text

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"

    def drop() -> None:
        from megaflow.db.engine import dispose_all

        dispose_all()
        for _ in range(30):  # the server may still be coming back from its restart
            try:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                break
            except DBAPIError:
                time.sleep(1)
        admin.dispose()
    return url, drop
