"""`megaflow flower | metrics | report`: watching a cluster and reporting on runs."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console

from megaflow.cli.errors import exit_on_errors, say_error

console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    for fn in (flower, metrics, report):
        app.command()(fn)


def flower(
    address: str = typer.Option("127.0.0.1", help="Address to bind. Anything but loopback needs "
                                "MEGAFLOW_FLOWER_BASIC_AUTH=user:password."),
    port: int = typer.Option(5555, help="Port to serve on."),
) -> None:
    """Flower on the MegaFlow app: live workers, tasks (run/episode in their args) and their timings.

    Episodes that ended failed or infra_failed show as FAILURE. The Broker tab reads RabbitMQ's
    management API (MEGAFLOW_FLOWER_BROKER_API; default derived from the broker URL, port 15672).
    Other Flower options are read from FLOWER_* environment variables.
    """
    from megaflow.config import Settings
    from megaflow.ops.flower import FlowerAuthError, run_flower, users

    secret = Settings().flower_basic_auth
    auth = secret.get_secret_value() if secret else None
    # Only user names are ever printed: the password stays in the environment.
    if auth:
        console.print(f"[dim]Flower asks for credentials (users: {', '.join(users(auth))})[/dim]")
    try:
        code = run_flower(address, port, auth)
    except FlowerAuthError as exc:
        say_error(console, exc)
        raise typer.Exit(2)
    raise typer.Exit(code or 0)


def metrics(
    port: int = typer.Option(9808, help="Port serving /metrics."),
    address: str = typer.Option("127.0.0.1", help="Address to bind."),
    settle: float = typer.Option(30.0, help="Counters fold in rows finished this many seconds ago (more than the "
                                 "clock skew between hosts); newer ones are read afresh on each scrape."),
    queue: list[str] = typer.Option(None, "--queue", help="Another queue to measure (repeatable)."),
) -> None:
    """Prometheus metrics from the state database and the broker: queues, hops, episodes, sandboxes, tokens."""
    from megaflow.config import Settings
    from megaflow.ops.metrics import MegaFlowCollector, serve

    collector = MegaFlowCollector(Settings(), queues=queue or (), settle_s=settle)
    server, thread = serve(collector, port, address)
    console.print(f"serving http://{address}:{server.server_port}/metrics; Ctrl-C to stop")
    try:
        while thread.is_alive():
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()


def report(
    run_id: str = typer.Argument(..., help="The run to report on."),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="HTML file to write."),
) -> None:
    """A self-contained HTML report of a run: throughput, concurrency, hop latency, rewards, failures."""
    from megaflow.config import Settings
    from megaflow.db.engine import session_scope
    from megaflow.ops.report import write_report

    with exit_on_errors(console), session_scope(Settings().resolved_database_url()) as s:
        size = write_report(s, run_id, out)
    console.print(f"report of run {run_id} written to {out} ({size // 1024} KiB)")
