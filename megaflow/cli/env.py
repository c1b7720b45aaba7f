"""`megaflow env build-base | build | validate` and `megaflow cleanup`: the Environment Service's tools."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, help="Sandbox images and task environments.")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="env")
    root.command()(cleanup)


def _docker_client():
    import docker
    from megaflow.errors import SandboxError

    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # whatever failed, the user must start or point to an engine
        raise SandboxError(f"no Docker engine answers ({exc}); export DOCKER_HOST=$(docker/start-dockerd.sh)") from exc
    return client


def _fail(exc: Exception) -> None:
    typer.secho(str(exc), fg="red", err=True)
    raise typer.Exit(1)


@app.command("build-base")
def build_base(force: bool = typer.Option(False, "--force", help="Rebuild even when cached."),
               desktop: bool = typer.Option(False, "--desktop", help="Also megaflow/desktop (computer-use tasks: "
                                            "X server and GUI applications, ~500 MB more).")) -> None:
    """Build megaflow/base (debootstrap) and the shipped images on it (megaflow/python); cached."""
    from megaflow.errors import SandboxError
    from megaflow.sandbox.images import build_base as do_build_base
    from megaflow.sandbox.contexts import shipped
    from megaflow.sandbox.images import build_image

    try:
        client = _docker_client()
        typer.echo(f"megaflow/base {do_build_base(client, force=force)[:19]}")
        for context in shipped(on_demand=desktop):
            tag = f"megaflow/{context.name}"
            typer.echo(f"{tag} {build_image(client, context, tag, force=force)[:19]}")
    except SandboxError as exc:
        _fail(exc)


@app.command()
def build(
    tasks: Path = typer.Argument(..., help="Tasks file, directory of tasks files, or run spec."),
    force: bool = typer.Option(False, "--force", help="Rebuild even when cached."),
    find_links: Path = typer.Option(None, "--find-links", help="Wheelhouse for environments' pip requirements "
                                    "(offline hosts); default $MEGAFLOW_WHEELHOUSE, else the package registries."),
    local: bool = typer.Option(False, "--local", help="Also build the environments' virtualenvs for the local "
                               "backend on this host."),
) -> None:
    """Prebuild every Docker image a task set needs: one per environment and per repo source (cached)."""
    from megaflow.config import Settings
    from megaflow.envs.environments import build_env_image, digest, ensure_venv
    from megaflow.envs.repos import REPO_BASE_IMAGE, build_repo_image
    from megaflow.validate import load_task_set
    from megaflow.errors import SandboxError, SpecError
    from megaflow.sandbox.contexts import context_dir
    from megaflow.sandbox.images import build_image

    settings = Settings()
    try:
        task_list = [t for t in load_task_set(tasks) if t.kind == "swe"]
        client = _docker_client()
        build_image(client, context_dir(REPO_BASE_IMAGE.split("/", 1)[1]), REPO_BASE_IMAGE)
        envs = {digest(t.environment): t.environment for t in task_list if t.environment is not None}
        for env in envs.values():
            typer.echo(f"{build_env_image(client, env, find_links, force=force)}  <- environment")
            if local:
                typer.echo(f"{ensure_venv(env, settings.data_dir, find_links)}  <- environment (local)")
        built = set()
        for t in task_list:
            if not t.repo or t.image:
                continue
            key = (t.repo, digest(t.environment) if t.environment else None)
            if key not in built:
                built.add(key)
                tag = build_repo_image(client, t.repo, settings.data_dir, force=force, env=t.environment,
                                       find_links=find_links)
                typer.echo(f"{tag}  <- {t.repo}")
    except (SandboxError, SpecError) as exc:
        _fail(exc)
    typer.echo(f"{len(built)} repo images, {len(envs)} environments ready")


@app.command()
def validate(
    tasks: Path = typer.Argument(..., help="Tasks file, directory of tasks files, or run spec."),
    sandbox: str = typer.Option(None, "--sandbox", help="Backend: local | docker | desktop (default: the run spec's, "
                                "desktop for computer tasks, else local)."),
    spec: Path = typer.Option(None, "--spec", help="Run spec whose sandbox settings to use (default: TASKS if a spec)."),
    timeout: float = typer.Option(300.0, help="Per-command timeout (seconds)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per task."),
) -> None:
    """Prove each task: gold solution earns 1, no change earns 0. Exits 1 if any task fails.

    Sandboxes get the configuration a run would give them (the run spec's ``sandbox``
    section). A failed check shows the command it ran, its exit code and its output's tail.
    """
    from rich.console import Console
    from rich.table import Table

    from megaflow.config import Settings
    from megaflow.validate import load_task_set, sandbox_for
    from megaflow.validate import validate as do_validate
    from megaflow.errors import SandboxError, SpecError
    from megaflow.sandbox.registry import make_backend

    settings = Settings()
    try:
        task_list = load_task_set(tasks)
        config = sandbox_for(tasks, sandbox, spec)
        if sandbox is None and task_list and all(t.kind == "computer" for t in task_list):
            config = config.model_copy(update={"type": "desktop"})  # they run nowhere else
        kwargs = {"local": {"root": settings.data_dir},
                  "desktop": {"artifacts_root": settings.data_dir / "artifacts"}}.get(config.type, {})
        backend = make_backend(config.type, **kwargs)
        reports = do_validate(task_list, backend, config, settings.data_dir, timeout)
    except (SandboxError, SpecError, ValueError) as exc:
        _fail(exc)
    if as_json:
        for r in reports:
            print(json.dumps({"instance_id": r.instance_id, "kind": r.kind, "ok": r.ok, "gold": r.gold,
                              "empty": r.empty, "problems": r.problems, "seconds": round(r.seconds, 2)}))
    else:
        table = Table(title=f"{tasks} on {config.type}")
        for col in ("instance", "kind", "gold", "no change", "ok", "s"):
            table.add_column(col)
        for r in reports:
            table.add_row(r.instance_id, r.kind, str(r.gold), str(r.empty), "yes" if r.ok else "NO",
                          f"{r.seconds:.1f}")
        Console().print(table)
        for r in reports:
            for problem in r.problems:
                typer.secho(f"{r.instance_id}: {problem}", fg="red", err=True)
    bad = [r for r in reports if not r.ok]
    typer.echo(f"{len(reports) - len(bad)} passed, {len(bad)} failed")
    if bad:
        raise typer.Exit(1)


def cleanup(
    all_hosts: bool = typer.Option(False, "--all-hosts", help="Reap every host's rows, not only this host's."),
    grace: float = typer.Option(120.0, help="Spare ended episodes and unrecorded sandboxes younger than this (s)."),
    backend: list[str] = typer.Option(None, "--backend", help="Backend to list (repeatable); default: all in use."),
) -> None:
    """Recover dead env hosts, then remove leaked sandboxes: expired leases, ended episodes, unrecorded ones."""
    from megaflow.app import make_app
    from megaflow.config import Settings
    from megaflow.reaper import reap
    from megaflow.scheduler.recovery import recover

    settings = Settings()
    try:  # their episodes move to live hosts first; their sandboxes become reapable
        rec = recover(make_app(settings))
        typer.echo(f"recovery: {len(rec['dead'])} hosts declared dead, {len(rec['rehomed'])} episodes re-homed, "
                   f"{rec['moved']} messages moved")
    except Exception as exc:  # noqa: BLE001 - reaping must not depend on the broker
        typer.secho(f"  recovery skipped: {type(exc).__name__}: {exc}", fg="yellow", err=True)
    report = reap(settings, all_hosts=all_hosts, grace_s=grace, backends=backend or None)
    typer.echo(f"hosts {', '.join(report['hosts'])}: {report['rows']} by row, {report['orphans']} unrecorded, "
               f"{len(report['errors'])} errors")
    for error in report["errors"]:
        typer.secho(f"  {error}", fg="yellow", err=True)
