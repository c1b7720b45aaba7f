"""`megaflow queues`: the RabbitMQ topology, for declaring it ahead of the workers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from queues.topology import DEFAULT_VHOST, definitions_json

app = typer.Typer(no_args_is_help=True, add_completion=False, help="The RabbitMQ queues MegaFlow uses.")


@app.command("definitions")
def definitions_cmd(
    vhost: Annotated[str, typer.Option("--vhost", help="The vhost of MEGAFLOW_BROKER_URL.")] = DEFAULT_VHOST,
    host: Annotated[list[str] | None,
                    typer.Option("--host", help="Also declare env.HOST for this env host (repeatable).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")] = None,
) -> None:
    """Print RabbitMQ definitions: the pool queues, the exchanges and the dead-letter queue.

    Import with `rabbitmqctl import_definitions FILE`; it creates the vhost if missing.

    queues/definitions.json is this output for compose's vhost `megaflow`.
    """
    text = definitions_json(host or (), vhost)
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)
