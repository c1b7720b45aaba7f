"""The `megaflow` command: one typer app, one module per subcommand group."""

from __future__ import annotations

import logging

import typer
from pydantic import ValidationError

from megaflow.cli import bench, db, env, export, ops, runs, sched, topology, workers
from megaflow.cli import policy as policy_cli
from megaflow.cli import rl as rl_cli
from megaflow.cli import train as train_cli

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="MegaFlow: many LLM-agent episodes on Celery, RabbitMQ and PostgreSQL.")
app.add_typer(db.app, name="db")
app.add_typer(bench.app, name="bench")
app.add_typer(topology.app, name="queues")
runs.register(app)
workers.register(app)
export.register(app)
env.register(app)
ops.register(app)
sched.register(app)
rl_cli.register(app)
policy_cli.register(app)
train_cli.register(app)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO.")) -> None:
    level = "INFO" if verbose else _log_level()
    logging.basicConfig(level=getattr(logging, level, logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from megaflow.redact import install_log_redaction

    install_log_redaction()


def _log_level() -> str:
    from megaflow.config import Settings

    try:
        return Settings().log_level.upper()
    except ValidationError:
        # A malformed MEGAFLOW_* variable: the command itself reports it, once its logging is set up.
        return "WARNING"


def main() -> None:
    app()
