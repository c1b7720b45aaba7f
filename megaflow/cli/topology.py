"""`megaflow queues`: the RabbitMQ topology, for declaring it ahead of the workers."""

from __future__ import annotations

from pathlib import Path

import typer

from queues.topology import DEFAULT_VHOST, definitions_json

app = typer.Typer(no_args_is_help=True, add_completion=False, help="The RabbitMQ queues MegaFlow uses.")


@app.command("definitions")
def definitions_cmd(
    vhost: str = typer.Option(DEFAULT_VHOST, "--vhost", help="The vhost of MEGAFLOW_BROKER_URL."),
    host: list[str] = typer.Option([], "--host", help="Also declare env.HOST for this env host (repeatable)."),
    output: Path = typer.Option(None, "--output", "-o", help="Write here instead of stdout."),
) -> None:
    """Print RabbitMQ definitions: the pool queues, the exchanges and the dead-letter queue.

    Import them with `rabbitmqctl import_definitions FILE` (or the management UI); the
    vhost is created if missing. queues/definitions.json is this for the vhost `megaflow`.
    """
    text = definitions_json(host, vhost)
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)
