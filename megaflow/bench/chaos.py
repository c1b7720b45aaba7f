"""`megaflow bench chaos`: a run under fire — workers SIGKILLed, RabbitMQ and PostgreSQL restarted.

One run of `episodes` episodes (scripted model, real sandboxes: bubblewrap or
docker) goes through three real worker pools while `megaflow.bench.faults.Killer`
SIGKILLs a random worker every few seconds (``8``: 8 s ±30 %; ``2-5``: 2 to 5 s)
and starts a new one, and RabbitMQ then PostgreSQL are restarted once each (when a
third and two thirds of the episodes have ended). A quarter of the tasks provision
slowly (a setup command sleeps 2–8 s), so kills land mid-provision too. Every
command has side effects a duplicate or a loss would change: it appends its step
to ``trace.txt``, toggles its own line of ``patch.txt`` and prints both; the last
command prints the whole trace and patch, and the check (the reward) passes only if
both are exactly what one run of each command leaves. The accounting trusts the
sandboxes and the rewards, not the ledger (`megaflow.bench.chaos_watch`):

* ``peak_sandboxes``: the most sandboxes that existed at once, counted from outside
  all through the run (``docker ps`` with the run's host label and the engine's
  create/destroy events; the sandbox directories for the local backend), against
  ``capacity`` (the env host's ``MEGAFLOW_SANDBOX_CAPACITY``, or ``--capacity``);
* ``episodes_lost``: current episodes not terminal once the run is over — finished,
  or no progress (no hop, no state change) for ``stall_s`` (120 s: longer than any
  retry countdown) with nothing ready on a queue, i.e. nothing in flight — measured
  before any resume; ``lost_episodes`` says where each stopped. Then the kills stop
  and the bench waits up to ``recover_s`` (420 s) for the platform's own safety nets
  (`megaflow.scheduler.admission.repair` re-sends an admitted episode's lost start
  message once it is 300 s old, from an env worker's once-a-minute chores):
  ``episodes_lost_after_recovery_wait``;
* ``chords_unclosed``: groups whose members are all terminal but whose callback never
  ran (plus 1 if every group closed but the run's own callback did not);
* ``duplicate_commands`` / ``commands_lost``: commands that ran twice / never, from
  what the sandboxes printed and from the rewards (``wrong_rewards``);
* ``infra_failed_self_made`` / ``infra_failed_injected``: every ``infra_failed``
  episode classified by `chaos_watch.classify_infra_failures` (in short: an
  ``exec_interrupted`` with an env-worker kill during its command, a ``poison`` whose
  pool was killed at least as often as the delivery limit, or a connection error
  during a service restart's retry window is injected; all else is self-made); the
  per-episode list is ``infra_failed_classified``;
* ``leaked_after_run``: sandboxes (containers or directories, plus live rows) left
  once the workers' own reapers had their turn (the workers keep running, reaping
  every ``reap_interval_s``, for up to ``reap_wait_s``) and *before* the bench runs
  any cleanup; ``sandboxes_reaped_by_cleanup`` is what ``megaflow cleanup`` then
  removed and ``leaked_after_cleanup`` what even that left;
* ``dead_lettered``: messages in ``megaflow.dead`` — ``dead_lettered_platform`` those
  that are not the bench's malformed ones (a platform message given up);
* ``bad_inputs_tried``: invalid specs (all refused) and malformed messages on every
  queue (all dead-lettered, the pickled one never unpickled), during the run.

Then ``megaflow resume`` re-runs the infra-failed episodes (``infra_failed_after_resume``).
`run_chaos_seeds` runs several seeds and says which targets held in each.
The bench uses a private RabbitMQ vhost and PostgreSQL database (or, with
``private_services``, a node and a server of its own), so nothing else is disturbed.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import func, select

from megaflow.bench import badinput
from megaflow.bench import chaos_checks as checks
from megaflow.bench.chaos_watch import SandboxWatcher, classify_infra_failures, sandbox_accounting, targets
from megaflow.bench.faults import (
    DEFAULT_POSTGRES_RESTART,
    DEFAULT_RABBITMQ_RESTART,
    FaultLog,
    Killer,
    amqp_ready,
    is_local,
    kill_interval,
    restart_service,
    sql_ready,
)
from megaflow.bench.floors import wait_for_worker
from megaflow.client import Client
from megaflow.config import Settings
from megaflow.db import states
from megaflow.db.models import Delivery, Episode, Event, Run, Step
from megaflow.db.schema import upgrade
from megaflow.hops.exec_journal import LOST_OUTPUT
from megaflow.local_stack import WorkerProcess

log = logging.getLogger(__name__)

N_COMMANDS = 4
#: Step i appends i to the trace, toggles line i+1 of the patch, and prints what the sandbox holds.
COMMAND = ("echo {step} >> trace.txt && sed -i '{line}{{s/^off$/on/;t;s/^on$/off/}}' patch.txt && "
           "echo \"trace $(wc -l < trace.txt) patch $(grep -c '^on$' patch.txt) line $(sed -n '{line}p' patch.txt)\"")
REPORT = "echo \"final $(tr '\\n' ' ' < trace.txt)|$(tr '\\n' ' ' < patch.txt)\""


def chaos_spec(episodes: int, steps: int = N_COMMANDS, rollouts: int = 4, sandbox: str = "local",
               latency_s: float = 0.05, slow_every: int = 4, seed: int = 0) -> dict:
    """Episodes whose every command leaves side effects that show a second execution or a loss.

    Every `slow_every`-th task provisions slowly (a setup command sleeps 2–8 s).
    """
    rollouts = rollouts if episodes % rollouts == 0 else 1
    rng = random.Random(seed)
    expected = " ".join(str(i) for i in range(steps))
    replies = [f"```bash\n{COMMAND.format(step=i, line=i + 1)}\n```" for i in range(steps)]
    tasks = []
    for i in range(episodes // rollouts):
        slow = slow_every > 0 and i % slow_every == slow_every - 1
        tasks.append({
            "instance_id": f"c{i}", "instruction": "append your step to trace.txt and toggle your patch line",
            "files": {"patch.txt": "off\n" * steps},
            "setup": [f"sleep {rng.uniform(2, 8):.1f}"] if slow else [],
            "check": f"test \"$(tr '\\n' ' ' < trace.txt)\" = \"{expected} \" && "
                     f"test \"$(grep -c '^on$' patch.txt)\" = {steps} && test \"$(wc -l < patch.txt)\" = {steps}"})
    return {
        "name": "bench-chaos", "rollouts": rollouts,
        "model": {"type": "scripted", "replies": [*replies, f"```bash\n{REPORT}\n```", "```bash\nsubmit\n```"],
                  "latency_s": latency_s},
        "sandbox": {"type": sandbox},
        "limits": {"max_steps": steps + 3, "exec_timeout_s": 60, "provision_timeout_s": 120},
        "tasks": tasks,
    }


#: What each seed's progress line shows beside its targets.
_SEED_KEYS = ("episodes_lost", "lost_by_state", "lost_episodes", "stalled", "longest_stall_s",
              "episodes_lost_after_recovery_wait", "chords_unclosed",
              "duplicate_commands", "commands_lost", "infra_failed_by_exit", "peak_sandboxes", "capacity",
              "sandboxes_at_run_end", "leaked_after_run", "sandboxes_reaped_by_cleanup", "dead_lettered_platform",
              "elapsed_s", "kills", "notes")


def run_chaos_seeds(seeds: list[int], progress=None, **kwargs) -> dict:
    """`run_chaos_bench` once per seed; every run's figures and which targets held in each."""
    runs = []
    for seed in seeds:
        fig = run_chaos_bench(seed=seed, **kwargs)
        runs.append(fig)
        if progress:
            held = ', '.join(f"{k}={'held' if v else 'MISSED'}" for k, v in fig['targets'].items())
            progress(f'seed {seed}: {held}')
            progress(json.dumps({k: fig.get(k) for k in _SEED_KEYS}, default=str))
    keys = ("episodes_lost", "chords_unclosed", "duplicate_commands", "commands_lost", "infra_failed",
            "infra_failed_self_made", "infra_failed_injected", "peak_sandboxes", "capacity", "leaked_after_run",
            "sandboxes_reaped_by_cleanup", "dead_lettered_platform", "elapsed_s", "faults_injected")
    names = list(runs[0]["targets"]) if runs else []
    return {"seeds": seeds,
            "per_seed": [{"seed": f["seed"], **{k: f.get(k) for k in keys}} for f in runs],
            "targets_held": {n: all(f["targets"][n] for f in runs) for n in names},
            "all_targets_held": all(all(f["targets"].values()) for f in runs),
            "runs": runs}


def run_chaos_bench(episodes: int = 500, kill_every_s: float | str = 10.0, sandbox: str = "local",
                    rabbitmq_restart: str | None = DEFAULT_RABBITMQ_RESTART,
                    postgres_restart: str | None = DEFAULT_POSTGRES_RESTART,
                    timeout_s: float = 3600.0, resume: bool = True, seed: int | None = None,
                    broker_url: str | None = None, database_url: str | None = None,
                    admin_database_url: str | None = None, keep: bool = False,
                    private_services: bool = False, private_vhost: bool = True, capacity: int | None = None,
                    stall_s: float = 120.0, recover_s: float = 420.0, reap_interval_s: float = 10.0,
                    reap_wait_s: float = 200.0) -> dict:
    """Run the chaos benchmark once; returns its figures (see the module docstring).

    With `private_services`, RabbitMQ and PostgreSQL are a node and a server of the
    bench's own (`megaflow.bench.services`), and the default restart commands restart those.
    """
    opts = {"capacity": capacity, "stall_s": stall_s, "recover_s": recover_s, "reap_interval_s": reap_interval_s,
            "reap_wait_s": reap_wait_s}
    if private_services:
        from megaflow.bench.services import PrivateServices

        with PrivateServices() as svc:
            if rabbitmq_restart == DEFAULT_RABBITMQ_RESTART:
                rabbitmq_restart = svc.rabbitmq.restart_command
            if postgres_restart == DEFAULT_POSTGRES_RESTART:
                postgres_restart = svc.postgres.restart_command
            figures = run_chaos_bench(episodes, kill_every_s, sandbox, rabbitmq_restart, postgres_restart, timeout_s,
                                      resume, seed, svc.rabbitmq.url, None, svc.postgres.url, keep,
                                      private_vhost=False, **opts)
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
    vhost_url, drop_vhost = checks.private_vhost(broker, name, faults) if private_vhost else (broker, None)
    db_url, drop_db = (database_url, None) if database_url else checks.private_database(admin, name)
    data_dir = Path(tempfile.mkdtemp(prefix="megaflow-chaos-"))
    capacity = capacity or base.sandbox_capacity
    # A host name of the run's own: the outside count filters the engine's containers on it.
    settings = Settings(data_dir=data_dir, broker_url=vhost_url, database_url=db_url, host=f"chaos-{name[-8:]}",
                        sandbox_capacity=capacity, reap_interval_s=reap_interval_s)
    for label, cmd, url in (("rabbitmq", rabbitmq_restart, broker), ("postgres", postgres_restart, db_url)):
        if cmd in (DEFAULT_RABBITMQ_RESTART, DEFAULT_POSTGRES_RESTART) and not is_local(url):
            faults.notes.append(f"{label} is not on this machine: its default restart command would restart "
                                "the wrong server; pass one")
    interval = kill_interval(kill_every_s)
    try:
        upgrade(db_url)
        figures = _run(settings, episodes, interval, sandbox, rabbitmq_restart, postgres_restart, timeout_s,
                       resume, rng, seed, faults, opts)
    finally:
        if not keep:
            drop_vhost and drop_vhost()
            drop_db and drop_db()
            shutil.rmtree(data_dir, ignore_errors=True)
    figures.update(seed=seed, kill_every_s=str(kill_every_s), kill_interval_s=list(interval), sandbox=sandbox,
                   notes=faults.notes)
    figures["targets"] = targets(figures)
    return figures


def _run(settings: Settings, episodes: int, interval, sandbox: str, rabbitmq_restart, postgres_restart,
         timeout_s: float, resume: bool, rng: random.Random, seed: int, faults: FaultLog, opts: dict) -> dict:
    client = Client(settings)

    def make_worker(pool: str, n: int) -> WorkerProcess:
        return WorkerProcess(pool, settings, name=f"chaos-{pool}-{n}")

    # Everything started is stopped, whatever fails after it: a failed start (a worker,
    # the watcher) left the workers started before it running.
    workers: dict[str, WorkerProcess] = {}
    killer = watcher = None
    try:
        for pool in ("model", "agent", "env"):
            workers[pool] = make_worker(pool, 0).start()
        killer = Killer(workers, make_worker, interval, faults, rng)
        watcher = SandboxWatcher(sandbox, settings.host, settings.data_dir)
        watcher.start()
        spec = chaos_spec(episodes, sandbox=sandbox, seed=seed)
        return _drive(client, settings, workers, killer, watcher, spec, rabbitmq_restart, postgres_restart,
                      timeout_s, resume, faults, opts)
    finally:
        if killer is not None:
            killer.stop()
        if watcher is not None:
            watcher.stop()
        for w in workers.values():
            w.stop()


def _drive(client: Client, settings: Settings, workers: dict, killer: Killer, watcher: SandboxWatcher, spec: dict,
           rabbitmq_restart, postgres_restart, timeout_s: float, resume: bool, faults: FaultLog, opts: dict) -> dict:
    episodes = len(spec["tasks"]) * spec["rollouts"]
    skip = {n.split(" ", 1)[0] for n in faults.notes}
    pending_restarts = [(1 / 3, "rabbitmq", rabbitmq_restart, amqp_ready(settings.broker_url)),
                        (2 / 3, "postgres", postgres_restart, sql_ready(settings.database_url))]
    for _, label, cmd, _ in pending_restarts:
        if not cmd:
            faults.notes.append(f"{label} restart skipped: no restart command given")
    pending_restarts = [r for r in pending_restarts if r[1] not in skip and r[2]]
    for w in workers.values():  # their queues (and megaflow.dead) are declared before anything is sent
        try:
            wait_for_worker(client.app, w.name, timeout=120)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; alive: {w.alive()}; its log ends: {w.last_line()}") from exc
    t0 = time.monotonic()
    run_id = client.submit(spec)
    killer.start()
    # Bad input alongside: specs that must be refused, raw messages that must be dead-lettered.
    refused = badinput.refuse_all(client)
    marker = settings.data_dir / "pickle-was-unpickled"
    malformed = badinput.malformed_messages(client.app, settings.host, marker)
    badinput.publish(settings.broker_url, malformed)
    deadline, stall_s = t0 + timeout_s, opts["stall_s"]
    st, last_log, mark, changed_at, stalled, longest = None, t0, None, t0, False, 0.0
    try:
        while time.monotonic() < deadline:
            st = checks.status(client, run_id) or st
            if st is not None and st["status"] == "finished":
                break
            now = time.monotonic()
            moved = checks.progress(client, run_id)
            if moved is not None and moved != mark:
                longest = max(longest, now - changed_at)
                mark, changed_at = moved, now
            elif now - changed_at > stall_s and not checks.queued(settings.broker_url, settings.host):
                stalled = True  # nothing moved for stall_s and nothing waits on a queue: what is left is lost
                break
            ended = sum(n for s, n in (st or {"by_state": {}})["by_state"].items() if s in states.TERMINAL)
            if now - last_log > 10:
                last_log = now
                log.info("chaos: %.0fs, %d of %d episodes ended, %d sandboxes (peak %d), %s", now - t0, ended,
                         episodes, watcher.current, watcher.peak, (st or {}).get("by_state"))
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
    figures = {"longest_stall_s": round(max(longest, time.monotonic() - changed_at if stalled else 0.0), 1),
               "stalled": stalled, "timed_out": not stalled and time.monotonic() >= deadline}
    lost = checks.lost_now(client, run_id) if stalled else None
    if lost:
        # Lost by the definition (nothing in flight). With the kills over, do the platform's own
        # safety nets (the scheduler's repair, the chord sweep) still finish them?
        t1 = time.monotonic()
        while time.monotonic() - t1 < opts["recover_s"]:
            st = checks.status(client, run_id)
            if st is not None and st["status"] == "finished":
                break
            time.sleep(2.0)
        figures["recovery_wait_s"] = round(time.monotonic() - t1, 1)
    figures.update(_outcome(client, run_id, episodes, elapsed, faults, settings))
    if lost:
        figures["episodes_lost_after_recovery_wait"] = figures["episodes_lost"]
        figures.update(lost)
    figures["capacity"] = settings.sandbox_capacity
    figures.update(checks.dead_letters(client.app, malformed))
    figures.update(bad_inputs_tried=len(badinput.BAD_SPECS) + len(malformed), bad_specs_refused=refused,
                   pickle_unpickled=marker.exists())
    figures["faults_injected"] = faults.injected
    figures["kills"] = dict(faults.kills)
    figures["service_restarts"] = [{k: r[k] for k in ("service", "ok", "seconds")} for r in faults.restarts]
    # Leftovers once the workers' own reapers had their turn: no cleanup yet.
    figures.update(checks.after_run(client, settings, watcher, run_id, opts["reap_wait_s"]))
    figures.update(watcher.figures())
    if resume and figures["infra_failed"] and figures["episodes_lost"] == 0:
        figures.update(_resume(client, run_id))
    for w in workers.values():
        w.stop()
    figures.update(checks.cleanup(settings, client, watcher))
    return figures


_HOP_POOL = {"model": "model", "provision": "env", "exec": "env", "evaluate": "env", "release": "env"}


def _outcome(client: Client, run_id: str, episodes: int, elapsed: float, faults: FaultLog,
             settings: Settings) -> dict:
    checks.settle_chords(client, run_id)
    with client.session() as s:
        current = s.execute(select(Episode).where(Episode.run_id == run_id, Episode.superseded_by.is_(None))
                            ).scalars().all()
        steps = s.execute(select(Step.episode_id, Step.index, Step.action, Step.observation).join(
            Episode, Episode.id == Step.episode_id).where(Episode.run_id == run_id)).all()
        redeliveries = s.execute(select(func.count()).select_from(Delivery)).scalar()
        poison = s.execute(select(func.count()).select_from(Event).where(Event.kind == "task.poison")).scalar()
        lost_outputs = s.execute(select(func.count()).select_from(Step).join(Episode, Episode.id == Step.episode_id)
                                 .where(Episode.run_id == run_id, Step.observation == LOST_OUTPUT)).scalar()
        failed_ids = [ep.id for ep in current if ep.state == states.INFRA_FAILED]
        # The last command of each failed episode: when it was decided, and how often its exec hop was delivered.
        last_exec = checks.last_exec_deliveries(s, failed_ids)
        decided = {(eid, i): at for eid, i, at in s.execute(select(Step.episode_id, Step.index, Step.created_at)
                                                           .where(Step.episode_id.in_(failed_ids))).all()}
        unclosed = checks.chords_unclosed(s, run_id)
        lost_detail = [checks.lost_detail(s, ep) for ep in current if ep.state not in states.TERMINAL][:10]
        run_status = s.get(Run, run_id).status
    by_ep: dict[str, list] = {}
    for eid, index, action, obs in steps:
        by_ep.setdefault(eid, []).append((index, action, obs))
    by_state: dict[str, int] = {}
    for ep in current:
        by_state[ep.state] = by_state.get(ep.state, 0) + 1
    lost = sum(n for st, n in by_state.items() if st not in states.TERMINAL)
    failed = [{"id": ep.id, "exit_status": ep.exit_status, "error": ep.error, "started_at": ep.started_at,
               "finished_at": ep.finished_at, "exec_decided_at": decided.get((ep.id, last_exec.get(ep.id, (None,))[0])),
               "exec_attempts": last_exec.get(ep.id, (None, 0))[1],
               "poison_hop": _HOP_POOL.get((ep.error or "").split(" ", 1)[0], "agent")}
              for ep in current if ep.state == states.INFRA_FAILED]
    classified = classify_infra_failures(failed, faults.kill_times, faults.restarts, settings.hop_max_deliveries)
    exits: dict[str, int] = {}
    for c in classified:
        key = f"{c['exit_status']} ({c['cause']})"
        exits[key] = exits.get(key, 0) + 1
    return {
        "episodes": len(current), "episodes_lost": lost if len(current) == episodes else episodes - len(current) + lost,
        "lost_by_state": {st: n for st, n in by_state.items() if st not in states.TERMINAL},
        "lost_episodes": lost_detail, "chords_unclosed": unclosed,
        **sandbox_accounting(current, by_ep, N_COMMANDS),
        "infra_failed": by_state.get(states.INFRA_FAILED, 0),
        "infra_failed_self_made": sum(1 for c in classified if c["cause"] == "self-made"),
        "infra_failed_injected": sum(1 for c in classified if c["cause"] == "injected"),
        "infra_failed_by_exit": exits, "infra_failed_classified": classified,
        "by_state": by_state, "run_finished": run_status == "finished", "all_terminal": lost == 0,
        "elapsed_s": round(elapsed, 1), "redelivered_messages": redeliveries, "poison_messages": poison,
        "exec_outputs_lost": lost_outputs,
    }


def _resume(client: Client, run_id: str) -> dict:
    report = client.resume(run_id)
    try:
        st = client.wait(run_id, timeout=900, poll=0.5)
    except TimeoutError:
        st = client.status(run_id)
    return {"resumed": report["rerun"], "infra_failed_after_resume": st["by_state"].get(states.INFRA_FAILED, 0),
            "by_state_after_resume": st["by_state"], "run_finished_after_resume": st["status"] == "finished"}
