"""An env worker's side of the host registry: join, beat, leave."""

from __future__ import annotations

import logging
import os

from megaflow.db.models import Episode
from megaflow.scheduler import admission, chords, hosts

log = logging.getLogger(__name__)


def host_images() -> list[str]:
    """Image tags present on this host's Docker engine (none without one)."""
    if not os.environ.get("DOCKER_HOST"):
        return []
    try:
        import docker

        client = docker.from_env(timeout=5)
        try:
            return sorted({tag for img in client.images.list() for tag in img.tags})
        finally:
            client.close()
    except Exception:
        log.debug("could not list docker images", exc_info=True)
        return []


def join(app, rt) -> hosts.HeartbeatThread:
    """Register the host, admit the waiters that now fit, and start the heartbeat."""
    settings = rt.settings
    with rt.session() as s:
        hosts.register(s, settings.host, settings.sandbox_capacity, host_images())
    with rt.session() as s:
        # Episodes this host's previous worker admitted and died before sending: again now.
        admitted = admission.unsent(s, Episode.host == settings.host)
        admitted += admission.admit_waiting(s, settings, rounds=max(1, settings.sandbox_capacity // admission.ROUND + 1))
    admission.send(app, admitted)
    log.info("env host %s joined (capacity %d); admitted %d waiting episodes",
             settings.host, settings.sandbox_capacity, len(admitted))

    def chores() -> None:
        with rt.session() as s:
            out = admission.repair(s, settings)
        admission.send(app, out)
        # Runs whose episodes all ended but whose chord never closed (a lost member).
        chords.close_unclosed(rt.session)

    beat = hosts.HeartbeatThread(rt.session, settings.host, settings.heartbeat_s, images=host_images,
                                 chores=chores, every=max(1, round(60 / settings.heartbeat_s)))
    beat.start()
    return beat


def leave(rt) -> None:
    try:
        with rt.session() as s:
            hosts.mark_down(s, rt.settings.host)
    except Exception:
        log.warning("could not mark host %s down", rt.settings.host, exc_info=True)
