"""Flower on the MegaFlow app: live workers and tasks, never open to other hosts without credentials.

Flower runs in this process (``Celery.start``), so the credentials handed to its
``--basic-auth`` option never appear on a command line that ``ps`` shows.
"""

from __future__ import annotations

import ipaddress
import logging
import os

from megaflow.config import Settings

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


def flower_argv(address: str, port: int, auth: str | None, tasks_columns: str = TASKS_COLUMNS) -> list[str]:
    """The ``celery`` arguments that start Flower (hold credentials: never log them)."""
    argv = ["flower", f"--address={address}", f"--port={port}", f"--tasks-columns={tasks_columns}"]
    if auth:
        argv.append(f"--basic-auth={auth}")
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
    return app.start(flower_argv(address, port, auth, columns))
