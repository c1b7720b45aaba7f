"""Flower on the MegaFlow app: live workers and tasks, never open to other hosts without credentials.

Flower runs in this process (``Celery.start``), so the credentials handed to its
``--basic-auth`` and ``--broker_api`` options never appear on a command line that ``ps``
shows. Two MegaFlow views are installed into that Flower (`install_views`): an episode
that ended failed stays FAILURE, and the Broker tab lists the dead-letter queue.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from urllib.parse import quote, unquote, urlsplit

from megaflow.config import Settings
from queues import topology

log = logging.getLogger(__name__)

#: ``user:password`` (several separated by commas) that Flower must ask for.
AUTH_ENV = "MEGAFLOW_FLOWER_BASIC_AUTH"

#: Columns of Flower's tasks page. Flower hides args by default, but a MegaFlow
#: task's args are what say which episode (and step) it serves. ``FLOWER_TASKS_COLUMNS`` overrides.
TASKS_COLUMNS = "name,args,state,received,runtime,worker,uuid"


class FlowerAuthError(ValueError):
    """Flower would answer other hosts without asking for credentials, or the credentials are malformed."""


def is_loopback(address: str) -> bool:
    """True when only this machine can reach `address`.

    A host name other than ``localhost`` counts as reachable from elsewhere: it
    may resolve to any interface, and an empty address means all of them.
    """
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def check_auth(address: str, auth: str | None) -> str | None:
    """Decide which credentials Flower gets.

    Args:
        address: the address Flower binds.
        auth: the value of ``MEGAFLOW_FLOWER_BASIC_AUTH``, or None.

    Returns:
        The credentials to pass to ``--basic-auth``, or None (loopback without any).

    Raises:
        FlowerAuthError: `address` is not loopback and no credentials were given, or
            they are not ``user:password``. The message never repeats a password.
    """
    if auth:
        for credential in auth.split(","):
            user, sep, password = credential.partition(":")
            if not (user.strip() and sep and password):
                raise FlowerAuthError(
                    f"{AUTH_ENV} must be user:password (several separated by commas); "
                    f"an entry for user {user.strip() or '?'!r} has no password")
        return auth
    if not is_loopback(address):
        raise FlowerAuthError(
            f"refusing to serve Flower on {address or 'every interface'} without authentication: "
            f"set {AUTH_ENV}=user:password (Flower's --basic-auth), or bind 127.0.0.1")
    return None


def broker_api(broker_url: str | None) -> str | None:
    """RabbitMQ's management API for an AMQP broker URL: same user, password and host.

    ``amqp://u:p@h:5672/vhost`` gives ``http://u:p@h:15672/api/`` (``amqps``: https, port
    15671); None for any other transport (Flower's Broker tab then has nothing to read).
    """
    if not broker_url:
        return None
    url = urlsplit(broker_url)
    if url.scheme not in ("amqp", "pyamqp", "amqps"):
        return None
    scheme, port = ("https", 15671) if url.scheme == "amqps" else ("http", 15672)
    user = quote(unquote(url.username or "guest"), safe="")
    password = quote(unquote(url.password or "guest"), safe="")
    host = url.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{user}:{password}@{host}:{port}/api/"


def flower_argv(address: str, port: int, auth: str | None, tasks_columns: str = TASKS_COLUMNS,
                api: str | None = None) -> list[str]:
    """The ``celery`` arguments that start Flower (hold credentials: never log them)."""
    argv = ["flower", f"--address={address}", f"--port={port}", f"--tasks-columns={tasks_columns}"]
    if auth:
        argv.append(f"--basic-auth={auth}")
    if api:
        argv.append(f"--broker_api={api}")
    return argv


def users(auth: str | None) -> list[str]:
    """The user names in a credentials string, safe to print."""
    return [c.partition(":")[0] for c in auth.split(",")] if auth else []


def run_flower(address: str, port: int, auth: str | None, settings: Settings | None = None) -> int | None:
    """Serve Flower in the foreground until interrupted.

    Raises:
        FlowerAuthError: as `check_auth`.
    """
    from megaflow.app import make_app

    auth = check_auth(address, auth)
    settings = settings or Settings()
    if settings.embedded:
        # Worker events travel on a fanout exchange, which the embedded SQLite
        # transport does not carry between processes: Flower would stay empty.
        log.warning("no MEGAFLOW_BROKER_URL: Flower sees no worker events on the embedded transport")
    app = make_app(settings)
    # A command-line option would override Flower's own environment variable.
    columns = os.environ.get("FLOWER_TASKS_COLUMNS") or TASKS_COLUMNS
    api = settings.flower_broker_api.get_secret_value() if settings.flower_broker_api else None
    install_views()
    return app.start(flower_argv(address, port, auth, columns, api or broker_api(settings.broker_url)))


def failure_is_current(task) -> bool:
    """True when a task's latest run sent ``task-failed`` (Flower's `celery.events.state.Task`).

    An episode's task id is kept by every decision of the episode (`continue_with`), and its
    last decision, ending the episode failed, sends ``task-failed`` then returns normally to
    its chord (`megaflow.hops.episode.tell_flower`), so the worker's ``task-succeeded``
    follows. Celery's state machine lets SUCCESS win over every other state in either order;
    a failure stamped after the latest start belongs to the latest run and must win instead.
    """
    return bool(task.failed and task.started and task.failed >= task.started)


def install_views() -> None:
    """Teach this process's Flower MegaFlow's two truths (idempotent).

    * A task whose latest run failed shows FAILURE (`failure_is_current`), so Flower's
      failed view and state filter list ended-failed episodes.
    * The Broker tab asks the management API for the pools' queues and the dead-letter
      queue as well: Flower lists only the queues its last look at the workers found (none
      of a worker it has not inspected yet), and nothing consumes ``megaflow.dead``.
    """
    from celery import states
    from flower import events
    from flower.views import BaseHandler

    if getattr(events.EventsState, "megaflow", False):
        return

    class MegaFlowEventsState(events.EventsState):
        megaflow = True

        def event(self, event):
            super().event(event)
            if event.get("type") in ("task-succeeded", "task-failed"):
                task = self.tasks.get(event.get("uuid"))
                if task is not None and task.state == states.SUCCESS and failure_is_current(task):
                    task.state = states.FAILURE
                    self._index_task(task, None)  # the search index filters on state

    queue_names = BaseHandler.get_active_queue_names

    def get_active_queue_names(handler):
        configured = {q.name for q in handler.capp.conf.task_queues or ()}
        return sorted({*queue_names(handler), *configured, topology.DEAD_QUEUE})

    events.EventsState = MegaFlowEventsState
    BaseHandler.get_active_queue_names = get_active_queue_names
