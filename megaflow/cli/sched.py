"""`megaflow scale | hosts | quota | capacity`: the scheduler's view and its knobs."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from megaflow.cli.errors import say_error

console = Console()

quota_app = typer.Typer(no_args_is_help=True, help="Administrative quotas per user or project.")
capacity_app = typer.Typer(no_args_is_help=True, help="Global and per-image limits on running episodes.")


def register(app: typer.Typer) -> None:
    app.command()(scale)
    app.command()(hosts)
    app.add_typer(quota_app, name="quota")
    app.add_typer(capacity_app, name="capacity")


def _settings():
    from megaflow.config import Settings

    return Settings()


def _admit_and_send(settings) -> int:
    """Admit the waiters a changed limit lets in (quotas and limits are events too)."""
    from megaflow.app import make_app
    from megaflow.db.engine import session_scope
    from megaflow.scheduler import admission

    with session_scope(settings.resolved_database_url()) as s:
        admitted = admission.admit_waiting(s, settings, rounds=64)
    if admitted:
        admission.send(make_app(settings), admitted)
    return len(admitted)


def scale(
    as_json: bool = typer.Option(False, "--json", help="One JSON object (for an autoscaler)."),
    window: float = typer.Option(120.0, help="Seconds of recent hops to measure the load over."),
    drain: float = typer.Option(60.0, help="Seconds in which a backlog should be drained."),
) -> None:
    """Backlog per queue and the recommended worker count per pool (and env hosts)."""
    from megaflow.app import make_app
    from megaflow.scheduler.scale import report

    settings = _settings()
    out = report(settings, make_app(settings), window_s=window, drain_s=drain)
    if as_json:
        print(json.dumps(out, default=str))
        return
    # Rates name their window: a rate without one cannot be compared with another's.
    table = Table("pool", "backlog", f"hops/s (last {window:g} s)", f"s/hop (last {window:g} s)",
                  f"queued s/hop (last {window:g} s)", "workers", "recommended", title="pools")
    for pool, p in out["pools"].items():
        table.add_row(pool, str(p["backlog"]), f"{p['hops_per_s']:.2f}", f"{p['seconds_per_hop']:.3f}",
                      f"{p['queued_s_per_hop']:.3f}", str(p["workers"]), str(p["recommended"]))
    console.print(table)
    env = out["pools"]["env"]
    console.print(f"env hosts: {env['hosts']} live, {env['recommended_hosts']} recommended; "
                  f"{out['episodes_active']} episodes active", highlight=False)
    if out["waiting"]:
        waiting = Table("waiting for", "episodes", title="waiting episodes")
        for reason, n in sorted(out["waiting"].items(), key=lambda kv: -kv[1]):
            waiting.add_row(str(reason), str(n))
        console.print(waiting)
    else:
        console.print("no episode is waiting")


def hosts(as_json: bool = typer.Option(False, "--json", help="One JSON object per host.")) -> None:
    """Env hosts: capacity, sandboxes in use, images, heartbeat."""
    from sqlalchemy import select

    from megaflow.db.engine import session_scope
    from megaflow.db.models import Host
    from megaflow.scheduler import semaphores

    settings = _settings()
    with session_scope(settings.resolved_database_url()) as s:
        rows = s.execute(select(Host).order_by(Host.name)).scalars().all()
        use = semaphores.usage(s, "host:")
        table = Table("host", "state", "in use", "capacity", "heartbeat", "images")
        for h in rows:
            used, limit = use.get(semaphores.host_key(h.name), (0, h.capacity))
            if as_json:
                print(json.dumps({"host": h.name, "state": h.state, "in_use": used, "capacity": limit,
                                  "heartbeat_at": h.heartbeat_at, "images": h.images or []}, default=str))
            table.add_row(h.name, h.state, str(used), str(limit), str(h.heartbeat_at)[:19], str(len(h.images or [])))
    if not as_json:
        console.print(table)


@quota_app.command("set")
def quota_set(
    scope: str = typer.Argument(..., help="user or project"),
    name: str = typer.Argument(...),
    max_concurrent: int = typer.Option(None, help="Episodes running at once (unset: no limit)."),
    max_total: int = typer.Option(None, help="Episodes admitted in all (unset: no limit)."),
) -> None:
    """Set a quota; waiting episodes it now allows are admitted at once."""
    from megaflow.db.engine import session_scope
    from megaflow.scheduler import quotas

    settings = _settings()
    try:
        with session_scope(settings.resolved_database_url()) as s:
            quotas.set_quota(s, scope, name, max_concurrent, max_total)
    except ValueError as exc:
        say_error(console, exc)
        raise typer.Exit(2) from exc
    console.print(f"quota {scope} {name} set; {_admit_and_send(settings)} waiting episodes admitted")


@quota_app.command("list")
def quota_list(as_json: bool = typer.Option(False, "--json")) -> None:
    from megaflow.db.engine import session_scope
    from megaflow.scheduler import quotas

    with session_scope(_settings().resolved_database_url()) as s:
        rows = quotas.list_quotas(s)
    if as_json:
        print(json.dumps(rows))
        return
    table = Table("scope", "name", "running", "max concurrent", "admitted", "max total")
    for q in rows:
        table.add_row(q["scope"], q["name"], str(q["running"]), str(q["max_concurrent"] or "-"),
                      str(q["admitted_total"]), str(q["max_total"] or "-"))
    console.print(table)


@capacity_app.command("set")
def capacity_set(
    key: str = typer.Argument(..., help="'global' or 'image:<tag>'"),
    limit: int = typer.Argument(..., help="Episodes at once; 0 or less: no limit."),
) -> None:
    """Limit running episodes in all, or per image (hosts' limits are their capacity)."""
    from megaflow.db.engine import session_scope
    from megaflow.scheduler import semaphores

    if key != semaphores.GLOBAL and not key.startswith("image:"):
        console.print("[red]key must be 'global' or 'image:<tag>' (host limits come from each host's capacity, "
                      "quotas from `megaflow quota set`)[/red]")
        raise typer.Exit(2)
    settings = _settings()
    with session_scope(settings.resolved_database_url()) as s:
        semaphores.set_limit(s, key, limit if limit > 0 else None)
    console.print(f"{key} limit set; {_admit_and_send(settings)} waiting episodes admitted")


@capacity_app.command("show")
def capacity_show(as_json: bool = typer.Option(False, "--json", help="One JSON object.")) -> None:
    """Every semaphore: slots used and its limit."""
    from megaflow.db.engine import session_scope
    from megaflow.scheduler import semaphores

    with session_scope(_settings().resolved_database_url()) as s:
        use = semaphores.usage(s)
    if as_json:
        print(json.dumps({key: {"used": used, "limit": limit} for key, (used, limit) in sorted(use.items())}))
        return
    table = Table("semaphore", "used", "limit")
    for key, (used, limit) in sorted(use.items()):
        table.add_row(key, str(used), str(limit if limit is not None else "-"))
    console.print(table)
