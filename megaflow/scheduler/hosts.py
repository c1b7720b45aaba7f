"""The env host registry and placement.

Each env worker registers its host (capacity, images it holds) when it starts and
renews a heartbeat every ``Settings.heartbeat_s``. Placement picks, among live hosts
with a free slot, one that already holds the episode's image, least loaded first
(chosen as the slot is taken: `semaphores.acquire_least_used`).
A host whose heartbeat is older than ``Settings.host_dead_after_s`` gets no new work.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from megaflow.db.models import Host, Semaphore, utcnow
from megaflow.db.sql import prepared, upsert
from megaflow.scheduler import semaphores

log = logging.getLogger(__name__)


def register(s: Session, name: str, capacity: int, images: list[str] | None = None) -> None:
    """Add or refresh a host; its semaphore's limit becomes its capacity."""
    now = utcnow()
    s.execute(upsert(s.connection(), Host.__table__,
                     {"name": name, "capacity": capacity, "images": images or [], "state": "up",
                      "started_at": now, "heartbeat_at": now}, ["name"]))
    semaphores.set_limit(s, semaphores.host_key(name), capacity)


def heartbeat(s: Session, name: str, images: list[str] | None = None) -> bool:
    values = {"heartbeat_at": utcnow(), "state": "up"}
    if images is not None:
        values["images"] = images
    return s.execute(update(Host).where(Host.name == name).values(**values)).rowcount == 1


def mark_down(s: Session, name: str) -> None:
    s.execute(update(Host).where(Host.name == name).values(state="down"))


def live_hosts(s: Session, dead_after_s: float, now: dt.datetime | None = None) -> list[dict]:
    """Live hosts with their load: name, capacity, used, images."""
    since = (now or utcnow()) - dt.timedelta(seconds=dead_after_s)
    conn = s.connection()
    # Read at every admission: a statement prepared once, not built each time.
    rows = conn.execute(prepared(conn, "hosts.live", _select_live), {"since": since}).all()
    return [{"name": n, "capacity": lim if lim is not None else cap, "used": used or 0, "images": imgs or []}
            for n, cap, imgs, used, lim in rows]


def _select_live(conn):
    h, sem = Host.__table__.c, Semaphore.__table__
    return (select(h.name, h.capacity, h.images, sem.c.used, sem.c.limit)
            .join_from(Host.__table__, sem, sem.c.key == "host:" + h.name, isouter=True)
            .where(h.state == "up", h.heartbeat_at >= bindparam("since", type_=h.heartbeat_at.type)))


def dead_hosts(s: Session, dead_after_s: float, now: dt.datetime | None = None) -> list[str]:
    """Hosts that stopped heartbeating without saying goodbye."""
    since = (now or utcnow()) - dt.timedelta(seconds=dead_after_s)
    return list(s.execute(select(Host.name).where(Host.state == "up", Host.heartbeat_at < since)).scalars())


def choices(hosts: list[dict], image: str | None) -> tuple[list[str], list[str]]:
    """Placement's semaphore keys: every live host, and those holding `image` (preferred);
    the least used of them is chosen as the slot is taken (`semaphores.acquire_least_used`)."""
    keys = [semaphores.host_key(h["name"]) for h in hosts]
    preferred = [semaphores.host_key(h["name"]) for h in hosts if image is not None and image in h["images"]]
    return keys, preferred


class HeartbeatThread(threading.Thread):
    """Renews this host's heartbeat; the images it reports come from `images()`.

    At its first beat, then every `every` beats, it also starts `chores()` (the
    scheduler's repair). The first beat, not the `every`-th: an env worker restarted
    often (crashes, a chaos run's kills) would otherwise never get that far, and
    what the repair recovers (a lost admission, a jammed chord) would wait forever.
    The chores run on a thread of their own: a repair slowed by a busy database must
    not delay the beats, or a healthy host reads as dead and gets no work.
    """

    def __init__(self, session_factory, name: str, interval_s: float, images=None, chores=None,
                 every: int = 12):
        super().__init__(name=f"megaflow-heartbeat-{name}", daemon=True)
        self.session_factory, self.host, self.interval_s = session_factory, name, interval_s
        self.images, self.chores, self.every = images, chores, every
        self._halt = threading.Event()
        self._chores: threading.Thread | None = None

    def run(self) -> None:
        beats = 0
        while not self._halt.wait(self.interval_s):
            beats += 1
            try:
                # Images change rarely; listing them is a call to the engine.
                imgs = self.images() if self.images and beats % self.every == 1 else None
                with self.session_factory() as s:
                    heartbeat(s, self.host, imgs)
            except Exception:
                # A missed beat is harmless unless they all fail; keep trying.
                log.warning("heartbeat of host %s failed", self.host, exc_info=True)
            if self.chores and (beats - 1) % self.every == 0:
                self._start_chores()

    def _start_chores(self) -> None:
        if self._chores is not None and self._chores.is_alive():
            return  # the last round is still going; one at a time
        self._chores = threading.Thread(target=self._run_chores, name=f"megaflow-chores-{self.host}", daemon=True)
        self._chores.start()

    def _run_chores(self) -> None:
        try:
            self.chores()
        except Exception:
            log.warning("scheduler chores of host %s failed", self.host, exc_info=True)

    def stop(self) -> None:
        self._halt.set()
