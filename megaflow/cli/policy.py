"""`megaflow policy publish PATH` and `megaflow policy list`: the policy versions model workers follow."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from megaflow.cli.errors import exit_on_errors, say_error

console = Console()
app = typer.Typer(no_args_is_help=True, help="Policy versions: publish a checkpoint, list what was published.")


class Kind(str, Enum):
    full = "full"
    lora = "lora"


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="policy")


def _client():
    """A client on the configured state database, its schema brought up to date (as `megaflow run` does)."""
    from megaflow.client import Client
    from megaflow.config import Settings
    from megaflow.db.schema import upgrade

    settings = Settings()
    if settings.embedded:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url())
    return Client(settings)


@app.command()
def publish(
    path: Annotated[Path, typer.Argument(help="A save_pretrained directory or state-dict file (full), or a PEFT "
                                         "adapter directory (lora).")],
    kind: Annotated[Kind, typer.Option("--kind", "-k", help="full weights or a LoRA adapter.")] = Kind.full,
    policy: Annotated[str | None, typer.Option("--policy", "-p", help="Policy name (default: RUN's rl.policy, "
                                               "else 'default').")] = None,
    run_id: Annotated[str | None, typer.Option("--run", help="A run whose rl.policy names the policy.")] = None,
    meta: Annotated[str | None, typer.Option(help="JSON kept with the version, e.g. '{\"step\": 12}'.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the version as JSON.")] = False,
) -> None:
    """Publish a checkpoint as its policy's next version; model workers switch to it between requests."""
    from megaflow.model.policy import PolicyError

    with exit_on_errors(console):
        try:
            extra = json.loads(meta) if meta else None
        except ValueError as exc:
            extra = exc
        if extra is not None and not isinstance(extra, dict):
            console.print("[red]--meta must be a JSON object, e.g. '{\"step\": 12}'; nothing published[/red]",
                          soft_wrap=True)
            raise typer.Exit(2)
        try:
            version = _client().publish_policy(path, kind=kind.value, policy=policy, run_id=run_id, meta=extra)
        except PolicyError as exc:
            say_error(console, f"{exc}; nothing published")
            raise typer.Exit(2) from exc
    if as_json:
        print(json.dumps({"version": version, "path": str(path.resolve()), "kind": kind.value}))
    else:
        console.print(f"published version {version} ({kind.value}) from {path.resolve()}")


@app.command(name="list")
def list_versions(
    policy: Annotated[str | None, typer.Option("--policy", "-p", help="Only this policy.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per version.")] = False,
) -> None:
    """Published versions, newest first, per policy."""
    from megaflow.model import policy as policies

    client = _client()
    with client.session() as s:
        rows = [{"policy": r.policy, "version": r.version, "kind": r.kind, "path": r.path, "meta": r.meta,
                 "created_at": r.created_at.isoformat()} for r in policies.versions(s, policy)]
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    if not rows:
        console.print("no policy versions published")
        return
    table = Table("policy", "version", "kind", "path", "published")
    for row in rows:
        table.add_row(row["policy"], str(row["version"]), row["kind"], row["path"], row["created_at"][:19])
    console.print(table)
