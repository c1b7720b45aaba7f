"""The reaper: removes sandboxes whose lease expired or whose episode ended.

Two sources of leaks, both covered:

* **Rows** of the ``sandboxes`` table still alive (not destroyed) whose lease has
  expired, or that serve an episode that ended more than `grace_s` ago (its release
  hop never ran: a crash, a lost message, a failed destroy).
* **Unrecorded sandboxes**: what the backends list with this host's label but no
  live row holds. An env worker SIGKILLed between ``create`` and recording the row
  leaves these. A sandbox made moments ago may simply not be recorded *yet*, so
  those created within `grace_s` (label ``megaflow.created``, a minute bucket: the
  backend protocol returns ids only, labels are all it can filter on) are spared.

Row states: ``in_use`` (an episode has it) → ``releasing`` (being reset for the
pool) → ``idle`` (in a warm pool) → ``in_use`` … and ``reaping`` (claimed by a
reaper) → ``destroyed``. Every move is a compare-and-set UPDATE, so a reaper and a
release hop never both act on one sandbox. ``lost``: its host was declared dead and
its episode re-homed (`megaflow.scheduler.recovery`); its lease is expired, so the
host's reaper destroys it if the host comes back.

`reap` runs from ``megaflow cleanup`` and, every ``Settings.reap_interval_s``, in
each env worker for its own host (`ReaperThread`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from pathlib import Path

from sqlalchemy import and_, or_, select, update

from megaflow.config import Settings
from megaflow.db import states
from megaflow.db.models import Episode, SandboxRow, utcnow
from megaflow.errors import SandboxError
from megaflow.runtime import Runtime

log = logging.getLogger(__name__)

HOST_LABEL = "megaflow.host"
CREATED_LABEL = "megaflow.created"
EPISODE_LABEL = "megaflow.episode"
#: Width of the ``megaflow.created`` buckets, in seconds.
CREATED_BUCKET_S = 60
#: Default time an ended episode's sandbox, or an unrecorded one, is left alone.
DEFAULT_GRACE_S = 120.0


def sandbox_labels(host: str, run_id: str | None = None, episode_id: str | None = None) -> dict[str, str]:
    """The labels every MegaFlow sandbox carries: its host, its birth minute, and whom it serves."""
    labels = {HOST_LABEL: host, CREATED_LABEL: str(int(time.time() // CREATED_BUCKET_S))}
    if run_id:
        labels["megaflow.run"] = run_id
    if episode_id:
        labels[EPISODE_LABEL] = episode_id
    return labels


def idle_lease_s(settings: Settings) -> float:
    """How long an idle pooled sandbox stays leased between two renewals by its worker."""
    return max(300.0, 3 * settings.reap_interval_s)


def reap(target: Runtime | Settings, host: str | None = None, *, all_hosts: bool = False,
         grace_s: float = DEFAULT_GRACE_S, backends: list[str] | None = None,
         now: dt.datetime | None = None) -> dict:
    """Destroy leaked sandboxes of one host (or all) and mark their rows destroyed.

    Args:
        target: The worker's runtime, or settings to make one from.
        host: Host whose sandboxes to reap; default ``settings.host``.
        all_hosts: Reap the rows of every host, and unrecorded sandboxes labelled
            with any known host that this machine's backends can see.
        grace_s: Ended episodes and unrecorded sandboxes younger than this are spared.
        backends: Backend types to list; default: those the rows name, ``local``,
            and ``docker`` when an engine is configured.
        now: The reaper's clock (tests move it forward to expire leases).

    Returns:
        ``{"hosts", "rows", "orphans", "destroyed", "errors"}``: rows reaped,
        unrecorded sandboxes destroyed, their ids, and what failed.
    """
    rt = target if isinstance(target, Runtime) else Runtime(target)
    now = now or utcnow()
    report = {"hosts": [], "rows": 0, "orphans": 0, "destroyed": [], "errors": []}
    hosts = _hosts(rt) if all_hosts else [host or rt.settings.host]
    report["hosts"] = hosts
    for row in _expired_rows(rt, None if all_hosts else hosts[0], now, grace_s):
        if _claim(rt, row) and _destroy(rt, row.backend, row.id, report):
            report["rows"] += 1
    for kind in backends or _default_backends(rt, hosts):
        _reap_unrecorded(rt, kind, hosts, now, grace_s, report)
    if report["destroyed"]:
        log.info("reaper: destroyed %d sandboxes (%d by row, %d unrecorded) on %s", len(report["destroyed"]),
                 report["rows"], report["orphans"], ",".join(hosts))
    for error in report["errors"]:
        log.info("reaper: %s", error)
    return report


def _hosts(rt: Runtime) -> list[str]:
    with rt.session() as s:
        known = set(s.execute(select(SandboxRow.host).distinct()).scalars())
        known |= {h for h in s.execute(select(Episode.host).distinct()).scalars() if h}
    return sorted(known | {rt.settings.host})


def _expired_rows(rt: Runtime, host: str | None, now: dt.datetime, grace_s: float) -> list[SandboxRow]:
    ended_before = now - dt.timedelta(seconds=grace_s)
    ended = and_(SandboxRow.state.in_(("creating", "in_use", "releasing", "reaping")),
                 or_(Episode.id.is_(None), and_(Episode.state.in_(states.TERMINAL),
                                                 Episode.finished_at < ended_before)))
    stmt = (select(SandboxRow).outerjoin(Episode, Episode.id == SandboxRow.episode_id)
            .where(SandboxRow.destroyed_at.is_(None), or_(SandboxRow.lease_expires_at < now, ended)))
    if host is not None:
        stmt = stmt.where(SandboxRow.host == host)
    with rt.session() as s:
        rows = list(s.execute(stmt).scalars())
        s.expunge_all()
    return rows


def _claim(rt: Runtime, row: SandboxRow) -> bool:
    """Take a row for reaping unless someone moved it since it was read."""
    with rt.session() as s:
        claimed = s.execute(update(SandboxRow).where(
            SandboxRow.id == row.id, SandboxRow.state == row.state, SandboxRow.destroyed_at.is_(None))
            .values(state="reaping")).rowcount == 1
    pool = rt.pool(create=False)
    if claimed and pool is not None:  # this process's pool must not hand it out again
        pool.discard(row.id)
    return claimed


#: Id prefix of a sandbox row claimed before its sandbox was created (`megaflow.hops.env_sandbox.obtain`
#: claims it; the reaper must not try to destroy a sandbox by that id).
CLAIM_PREFIX = "claim-"


def _destroy(rt: Runtime, kind: str, sandbox_id: str, report: dict) -> bool:
    rt.forget_sandbox(sandbox_id)
    try:
        if not sandbox_id.startswith(CLAIM_PREFIX):  # a claim whose create never finished holds no sandbox
            rt.backend(kind).destroy(sandbox_id)
    except (SandboxError, ValueError) as exc:
        report["errors"].append(f"destroy {kind}:{sandbox_id[:12]}: {exc}")
        return False
    with rt.session() as s:
        s.execute(update(SandboxRow).where(SandboxRow.id == sandbox_id, SandboxRow.destroyed_at.is_(None))
                  .values(state="destroyed", destroyed_at=utcnow()))
    report["destroyed"].append(sandbox_id)
    return True


def _default_backends(rt: Runtime, hosts: list[str]) -> list[str]:
    with rt.session() as s:
        kinds = set(s.execute(select(SandboxRow.backend).where(SandboxRow.host.in_(hosts)).distinct()).scalars())
    kinds.add("local")
    if os.environ.get("DOCKER_HOST") or Path("/var/run/docker.sock").exists():
        kinds.add("docker")
    kinds.discard("memory")  # an in-process store: nothing of another process to find
    return sorted(kinds)


def _reap_unrecorded(rt: Runtime, kind: str, hosts: list[str], now: dt.datetime, grace_s: float,
                     report: dict) -> None:
    try:
        backend = rt.backend(kind)
        for host in hosts:
            listed = set(backend.list_ids({HOST_LABEL: host}))
            if not listed:
                continue
            with rt.session() as s:
                live = set(s.execute(select(SandboxRow.id).where(
                    SandboxRow.id.in_(listed), SandboxRow.destroyed_at.is_(None))).scalars())
            suspects = listed - live
            if suspects and grace_s > 0:
                suspects -= _young(backend, host, now, grace_s)
            for sandbox_id in sorted(suspects):
                if _destroy(rt, kind, sandbox_id, report):
                    report["orphans"] += 1
    except (SandboxError, ImportError) as exc:
        report["errors"].append(f"list {kind}: {exc}")


def _young(backend, host: str, now: dt.datetime, grace_s: float) -> set[str]:
    """Sandboxes of `host` created within `grace_s` (rounded up to whole buckets)."""
    newest = int(now.timestamp() // CREATED_BUCKET_S)
    oldest = int((now.timestamp() - grace_s) // CREATED_BUCKET_S)
    young: set[str] = set()
    for bucket in range(oldest, newest + 2):  # +1: a clock a little ahead of ours
        young |= set(backend.list_ids({HOST_LABEL: host, CREATED_LABEL: str(bucket)}))
    return young


def renew_idle_leases(rt: Runtime) -> int:
    """Extend the leases of this process's idle pooled sandboxes; returns how many."""
    pool = rt.pool(create=False)
    ids = pool.idle_ids() if pool is not None else []
    if not ids:
        return 0
    lease = utcnow() + dt.timedelta(seconds=idle_lease_s(rt.settings))
    with rt.session() as s:
        return s.execute(update(SandboxRow).where(SandboxRow.id.in_(ids), SandboxRow.state == "idle")
                         .values(lease_expires_at=lease, heartbeat_at=utcnow())).rowcount


class ReaperThread(threading.Thread):
    """Every `interval_s`: renew the idle pool's leases, then reap this host. A daemon thread.

    Args:
        rt: The env worker's runtime (its pool is the one whose leases are renewed).
        interval_s: Seconds between two rounds. The first round runs at once: a worker
            restarted after a crash (often, under a chaos run's kills) must not wait a
            full interval to clean up what its previous life left, or it never does.
    """

    def __init__(self, rt: Runtime, interval_s: float):
        super().__init__(name="megaflow-reaper", daemon=True)
        self.rt, self.interval_s = rt, interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                renew_idle_leases(self.rt)
                reap(self.rt)
            except Exception:  # a failed round (database down) must not end the timer
                log.warning("reaper round failed; next in %.0fs", self.interval_s, exc_info=True)
            if self._stop_event.wait(self.interval_s):
                break

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the current round; wait up to `timeout` for it."""
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout)

