"""`megaflow worker POOL` and `megaflow up`."""

from __future__ import annotations

import os
import time

import typer

from queues.topology import POOLS


def register(app: typer.Typer) -> None:
    app.command()(worker)
    app.command()(up)


def worker(
    pool: str = typer.Argument(..., help="model | agent | env"),
    concurrency: int = typer.Option(None, "-c", "--concurrency", help="Worker threads/processes."),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l"),
    events: bool = typer.Option(True, "--events/--no-events", help="Send task events (for Flower)."),
    name: str = typer.Option(None, "-n", "--name", help="Celery node name (default POOL-PID@HOST: unique, so "
                             "several workers of a pool can run on one host)."),
) -> None:
    """Run one pool's Celery worker in the foreground, consuming only that pool's queues.

    Start more of them, on this host or others, to scale the pool: each takes its share
    of the pool's queues.
    """
    if pool not in POOLS:
        raise typer.BadParameter(f"pool must be one of {', '.join(POOLS)}")
    from workers.common import make_worker_app

    app = make_worker_app(pool)
    # Celery's node names must be unique (its pidbox queue is per name): a fixed POOL@HOST
    # made a second worker of a pool on the same host exit with ResourceLocked.
    argv = ["worker", "-n", name or f"{pool}-{os.getpid()}@%h", "--loglevel", loglevel]
    if concurrency:
        argv += ["-c", str(concurrency)]
    if events:
        argv.append("-E")
    app.worker_main(argv)


def up() -> None:
    """Start the embedded stack (SQLite, server-free transport, three pools) until Ctrl-C, SIGTERM or SIGHUP."""
    from megaflow.cli.runs import tell_unfinished
    from megaflow.config import Settings
    from megaflow.local_stack import LocalStack

    settings = Settings()
    try:
        with LocalStack(settings) as stack:
            typer.echo(f"MegaFlow embedded stack up (state in {settings.data_dir}); Ctrl-C to stop.")
            tell_unfinished(stack.unfinished)
            while True:
                stack.check()
                time.sleep(1)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM/SIGHUP (LocalStack raises Stopped): workers stopped on exit
        _say("stopped")
    except RuntimeError as exc:  # a worker died
        _say(str(exc))
        raise typer.Exit(1)


def _say(text: str) -> None:
    try:
        typer.echo(text)
    except OSError:  # the terminal is gone (SIGHUP)
        pass
