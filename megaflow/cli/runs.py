"""`megaflow run | submit | status | cancel | results`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from megaflow.errors import SpecError

console = Console()


def register(app: typer.Typer) -> None:
    for fn in (run, submit, status, cancel, results, resume):
        app.command()(fn)


def _client():
    from megaflow.client import Client

    return Client()


def _load(spec_path: Path):
    from megaflow.spec import RunSpec

    try:
        return RunSpec.load(spec_path)
    except SpecError as exc:
        console.print(f"[red]spec refused, nothing queued:[/red] {exc}")
        raise typer.Exit(2)


def run(
    spec_path: Path = typer.Argument(..., help="Run spec (YAML or JSON)."),
    timeout: float = typer.Option(None, help="Give up waiting after this many seconds."),
) -> None:
    """Submit a run and follow it to the end. With no broker configured, starts the embedded stack."""
    from megaflow.config import Settings

    spec = _load(spec_path)
    settings = Settings()
    if settings.embedded:
        from megaflow.local_stack import LocalStack

        console.print(f"[dim]embedded stack: state in {settings.data_dir}[/dim]")
        with LocalStack(settings) as stack:
            _run_and_follow(spec, timeout, stack.check)
    else:
        from megaflow.db.schema import upgrade

        upgrade(settings.resolved_database_url())
        _run_and_follow(spec, timeout, None)


def _submit(client, spec) -> str:
    try:
        return client.submit(spec)
    except SpecError as exc:
        console.print(f"[red]spec refused, nothing queued:[/red] {exc}")
        raise typer.Exit(2)


def _run_and_follow(spec, timeout, check) -> None:
    client = _client()
    run_id = _submit(client, spec)
    console.print(f"run [bold]{run_id}[/bold]: {spec.n_episodes} episodes")
    final = follow(client, run_id, timeout=timeout, check=check)
    print_results(client, run_id)
    if final["status"] != "finished":
        raise typer.Exit(1)


def submit(spec_path: Path = typer.Argument(..., help="Run spec (YAML or JSON).")) -> None:
    """Submit a run to the configured cluster and print its id."""
    spec = _load(spec_path)
    print(_submit(_client(), spec))


def status(
    run_id: str,
    watch: bool = typer.Option(False, "--watch", "-w", help="Live progress until the run ends."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Episodes by state, steps, mean reward; --watch shows live progress bars."""
    client = _client()
    if watch:
        final = follow(client, run_id)
        if final["status"] != "finished":
            raise typer.Exit(1)
        return
    st = client.status(run_id)
    if as_json:
        print(json.dumps(st, default=str))
    else:
        console.print(st)


def resume(
    run_id: str,
    follow_run: bool = typer.Option(None, "--follow/--no-follow",
                                    help="Follow to the end (default: yes on the embedded stack, no on a cluster)."),
    timeout: float = typer.Option(None, help="Give up following after this many seconds."),
    as_json: bool = typer.Option(False, "--json", help="Print what was resumed as JSON."),
) -> None:
    """Continue a run after a full stop: unfinished and infra-failed episodes run again as new attempts."""
    from megaflow.config import Settings
    from megaflow.resume import ResumeError

    settings = Settings()

    def go(check=None) -> None:
        client = _client()
        try:
            report = client.resume(run_id)
        except (LookupError, ResumeError) as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(1)
        if as_json:
            print(json.dumps(report))
        else:
            console.print(f"run [bold]{run_id}[/bold] resumed (generation {report['generation']}): "
                          f"{report['rerun']} episodes run again ({report['interrupted']} interrupted, "
                          f"{report['infra_failed']} infra-failed) in {report['groups']} groups")
        if follow_run or (follow_run is None and settings.embedded):
            final = follow(client, run_id, timeout=timeout, check=check)
            if final["status"] != "finished":
                raise typer.Exit(1)

    if settings.embedded and follow_run is not False:
        from megaflow.local_stack import LocalStack

        with LocalStack(settings) as stack:
            go(stack.check)
    else:
        from megaflow.db.schema import upgrade

        upgrade(settings.resolved_database_url())
        go()


def cancel(run_id: str) -> None:
    """Cancel a run: pending episodes at once, running ones at their next step."""
    n = _client().cancel(run_id)
    console.print(f"cancel requested; {n} pending episodes cancelled")


def results(run_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """One line per episode."""
    client = _client()
    if as_json:
        for row in client.results(run_id):
            print(json.dumps(row))
    else:
        print_results(client, run_id)


def follow(client, run_id: str, timeout: float | None = None, check=None, poll: float = 0.5) -> dict:
    """Live progress until the run ends: episodes by state, steps/s, mean reward, failures by kind."""
    from megaflow.cli.progress import follow as show

    try:
        return show(client, run_id, console, timeout=timeout, check=check, poll=poll)
    except TimeoutError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1)


def print_results(client, run_id: str) -> None:
    rows = client.results(run_id)
    table = Table(title=f"run {run_id}")
    for col in ("instance", "sample", "state", "exit", "reward", "steps"):
        table.add_column(col)
    for r in rows[:200]:
        reward = "" if r["reward"] is None else f"{r['reward']:g}"
        table.add_row(r["instance_id"], str(r["sample"]), r["state"], r["exit_status"] or "", reward,
                      str(r["steps"]))
    console.print(table)
    if len(rows) > 200:
        console.print(f"... and {len(rows) - 200} more episodes")
    summary = client.status(run_id)["summary"] or {}
    console.print(f"summary: {json.dumps(summary)}")
