"""`megaflow run | submit | status | cancel | results`."""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from megaflow.cli.errors import say_error
from megaflow.errors import SpecError

console = Console()


def register(app: typer.Typer) -> None:
    for fn in (run, submit, status, cancel, results, resume):
        app.command()(fn)


def _client():
    from megaflow.client import Client

    return Client()


def _load(spec_path: Path):
    """The spec, fully checked as input (deadlines too) before any backend is: a bad spec exits 2."""
    from megaflow.config import Settings
    from megaflow.deadlines import check_spec
    from megaflow.spec import RunSpec

    try:
        spec = RunSpec.load(spec_path)
        check_spec(spec, Settings())
        return spec
    except SpecError as exc:
        console.print(f"[red]spec refused, nothing queued:[/red] {exc}")
        raise typer.Exit(2)


#: `megaflow run --timeout` default: long enough for the shipped examples many times over,
#: short enough that a run that cannot progress does not hold a terminal for good.
DEFAULT_TIMEOUT_S = 3600.0
#: Exit codes beyond 1 (the run did not finish) and 2 (bad input).
EXIT_PREFLIGHT = 3
EXIT_TIMEOUT = 4


def run(
    spec_path: Path = typer.Argument(..., help="Run spec (YAML or JSON)."),
    timeout: float = typer.Option(
        DEFAULT_TIMEOUT_S, help="Stop following after this many seconds (0: never). On expiry the command exits "
        f"{EXIT_TIMEOUT}: the embedded stack's workers stop and the run stays unfinished (`megaflow resume RUN` "
        "continues it); on a cluster the run goes on."),
    check: bool = typer.Option(True, "--check/--no-check",
                               help="Check first that the sandbox and model backends can work here."),
) -> None:
    """Submit a run and follow it to the end. With no broker configured, starts the embedded stack."""
    from megaflow.config import Settings

    spec = _load(spec_path)
    settings = Settings()
    if check:
        _preflight(spec, settings)
    if settings.embedded:
        from megaflow.local_stack import LocalStack

        if check:  # the env and model workers check the run's backends again at their start
            sandboxes = sorted({*settings.required_sandboxes(), spec.sandbox.type})
            models = sorted({*settings.required_models(), spec.model.type})
            settings = settings.model_copy(update={"sandbox_backends": ",".join(sandboxes),
                                                   "model_backends": ",".join(models)})
        console.print(f"[dim]embedded stack: state in {settings.data_dir}, worker logs in "
                      f"{settings.data_dir / 'logs'}[/dim]")
        def go(stack) -> None:
            tell_unfinished(stack.unfinished)
            _run_and_follow(spec, timeout, stack)

        _in_stack(LocalStack(settings), go)
    else:
        from megaflow.db.schema import upgrade

        upgrade(settings.resolved_database_url())
        _run_and_follow(spec, timeout, None)


def _in_stack(stack, go, run_id: str | None = None) -> None:
    """`go(stack)` with the embedded stack running; a stop signal or a worker dead at start ends the command."""
    try:
        with stack:
            go(stack)
    except KeyboardInterrupt as exc:
        if run_id is not None:
            exc.run_id = run_id
        _stopped(exc)
    except typer.Exit:  # a RuntimeError too
        raise
    except RuntimeError as exc:  # a worker died at start (its log's last line says why)
        say_error(console, exc)
        raise typer.Exit(1)


def _preflight(spec, settings) -> None:
    """Refuse, nothing queued, when the run's backends cannot work: one line, exit 3.

    On the embedded stack this host runs everything, so everything is checked here.
    On a cluster sandboxes and models live on the env and model hosts, whose workers
    check at start; from here only an OpenAI-compatible endpoint is checked.
    """
    from megaflow.preflight import PreflightError, check_spec

    here = settings.embedded
    try:
        check_spec(spec, settings, sandbox=here, model=here)
    except PreflightError as exc:
        console.print(f"[red]cannot run, nothing queued:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_PREFLIGHT)


def tell_unfinished(runs: list[dict]) -> None:
    """Say which runs an earlier stack on this data directory left unfinished, and how to go on.

    Their queued messages (and those the earlier workers held) are delivered to this
    stack, so they usually just go on; one whose messages are gone needs `resume`.
    """
    for r in runs:
        console.print(f"[yellow]run {r['id']} ({r['name']}) was left unfinished by an earlier stack "
                      f"({r['ended']}/{r['episodes']} episodes ended): its queued work goes on here; if it makes "
                      f"no progress, `megaflow resume {r['id']}` runs its unfinished episodes again, "
                      f"`megaflow cancel {r['id']}` drops it[/yellow]", highlight=False, soft_wrap=True)


def _stopped(exc: KeyboardInterrupt) -> None:
    """After a stop signal the workers have stopped: say so and how to continue; exit 128 + signal."""
    from megaflow.local_stack import Stopped

    signum = exc.signum if isinstance(exc, Stopped) else int(signal.SIGINT)
    run_id = getattr(exc, "run_id", None)
    where = f"; run {run_id} is unfinished: `megaflow resume {run_id}` continues it" if run_id else ""
    try:
        console.print(f"stopped by {signal.Signals(signum).name}: workers stopped{where}", highlight=False,
                      soft_wrap=True)
    except OSError:  # the terminal is gone (SIGHUP)
        pass
    raise typer.Exit(128 + signum)


def _submit(client, spec) -> str:
    try:
        return client.submit(spec)
    except SpecError as exc:
        console.print(f"[red]spec refused, nothing queued:[/red] {exc}")
        raise typer.Exit(2)


def _run_and_follow(spec, timeout, stack) -> None:
    client = _client()
    run_id = _submit(client, spec)
    console.print(f"run [bold]{run_id}[/bold]: {spec.n_episodes} episodes")
    try:
        final = follow(client, run_id, timeout=timeout, stack=stack)
    except KeyboardInterrupt as exc:
        exc.run_id = run_id  # named in the message once the stack has stopped
        raise
    print_results(client, run_id)
    if final["status"] != "finished":
        raise typer.Exit(1)


def submit(
    spec_path: Path = typer.Argument(..., help="Run spec (YAML or JSON)."),
    check: bool = typer.Option(True, "--check/--no-check",
                               help="Check first that the sandbox and model backends can work."),
) -> None:
    """Submit a run to the configured cluster (or an embedded `megaflow up`) and print its id."""
    from megaflow.config import Settings

    spec = _load(spec_path)
    if check:
        _preflight(spec, Settings())
    print(_submit(_client(), spec))


def status(
    run_id: str,
    watch: bool = typer.Option(False, "--watch", "-w", help="Live progress until the run ends."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of the table."),
) -> None:
    """Episodes by state, steps, mean reward; --watch shows live progress bars."""
    client = _client()
    if watch:
        try:
            final = follow(client, run_id)
        except LookupError as exc:
            _unknown(exc)
        if final["status"] != "finished":
            raise typer.Exit(1)
        return
    try:
        st = client.status(run_id)
    except LookupError as exc:
        _unknown(exc)
    if as_json:
        print(json.dumps(st, default=str))
    else:
        console.print(status_table(st))


def status_table(st: dict) -> Table:
    """A run's `Client.status` as a table: one row per episode state, then steps, reward and summary."""
    from megaflow.ops.stats import STATE_ORDER

    title = f"run {st['run_id']} · {st['name']} · {st['status']}"
    table = Table(title=title, min_width=len(title) + 4, title_justify="left")
    table.add_column("episodes by state")
    table.add_column("", justify="right")
    by_state = st["by_state"]
    for state in (*STATE_ORDER, *sorted(set(by_state) - set(STATE_ORDER))):
        if by_state.get(state):
            table.add_row(state, str(by_state[state]))
    table.add_row("total", str(st["episodes"]), end_section=True)
    table.add_row("steps", str(st["steps"]))
    table.add_row("mean reward", "" if st["mean_reward"] is None else f"{st['mean_reward']:.3f}")
    for reason, n in (st.get("waiting") or {}).items():
        table.add_row(f"waiting: {reason}", str(n))
    if st.get("chord_unclosed"):
        table.add_row("[red]chord not closed[/red]", "every episode ended, the run did not: an env worker's "
                      "repair sweep closes it within a minute")
    for key, value in (st.get("summary") or {}).items():
        if key not in ("episodes", "mean_reward") and not isinstance(value, (dict, list)):
            table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    return table


def resume(
    run_id: str,
    follow_run: bool = typer.Option(None, "--follow/--no-follow",
                                    help="Follow to the end (default: yes on the embedded stack, no on a cluster)."),
    timeout: float = typer.Option(None, help="Give up following after this many seconds."),
    as_json: bool = typer.Option(False, "--json", help="Print what was resumed as JSON."),
    check: bool = typer.Option(True, "--check/--no-check",
                               help="Check first that the run's sandbox and model backends can work."),
) -> None:
    """Continue a run after a full stop: unfinished and infra-failed episodes run again as new attempts."""
    from megaflow.config import Settings
    from megaflow.resume import ResumeError

    settings = Settings()
    if check:
        _preflight(_stored_spec(settings, run_id), settings)

    def go(stack=None) -> None:
        client = _client()
        try:
            report = client.resume(run_id)
        except (LookupError, ResumeError) as exc:
            say_error(console, exc)
            raise typer.Exit(1)
        if as_json:
            print(json.dumps(report))
        else:
            console.print(f"run [bold]{run_id}[/bold] resumed (generation {report['generation']}): "
                          f"{report['rerun']} episodes run again ({report['interrupted']} interrupted, "
                          f"{report['infra_failed']} infra-failed) in {report['groups']} groups")
        if follow_run or (follow_run is None and settings.embedded):
            final = follow(client, run_id, timeout=timeout, stack=stack)
            if final["status"] != "finished":
                raise typer.Exit(1)

    if settings.embedded and follow_run is not False:
        from megaflow.local_stack import LocalStack

        _in_stack(LocalStack(settings), go, run_id)
    else:
        from megaflow.db.schema import upgrade

        upgrade(settings.resolved_database_url())
        go()


def _stored_spec(settings, run_id: str):
    """The spec a run was submitted with (exit 1 when there is no such run)."""
    from megaflow.db.engine import session_scope
    from megaflow.db.models import Run
    from megaflow.db.schema import upgrade
    from megaflow.spec import RunSpec

    if settings.embedded:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url())
    with session_scope(settings.resolved_database_url()) as s:
        run = s.get(Run, run_id)
        if run is None:
            console.print(f"[red]no run {run_id}[/red]")
            raise typer.Exit(1)
        return RunSpec.model_validate(run.spec)


def cancel(run_id: str, as_json: bool = typer.Option(False, "--json", help="One JSON object.")) -> None:
    """Cancel a run: pending and waiting episodes at once, running ones at their next step."""
    try:
        by_state = _client().cancel(run_id)
    except LookupError as exc:
        _unknown(exc)
    if as_json:
        print(json.dumps(by_state))
        return
    now = {k: by_state.get(k, 0) for k in ("pending", "waiting")}
    later = {k: v for k, v in by_state.items() if k not in now and v}
    console.print(f"run {run_id}: cancelled now: {now['pending']} pending, {now['waiting']} waiting; "
                  + (f"ending at their next step: {', '.join(f'{v} {k}' for k, v in later.items())}"
                     if later else "none in flight"), highlight=False)


def _unknown(exc: LookupError) -> None:
    """An unknown run id: one line, exit status 2 (a usage error, as typer's own)."""
    say_error(console, exc.args[0] if exc.args else exc)
    raise typer.Exit(2)


def results(run_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """One line per episode."""
    client = _client()
    try:
        rows = client.results(run_id)
    except LookupError as exc:
        _unknown(exc)
    if as_json:
        for row in rows:
            print(json.dumps(row))
    else:
        print_results(client, run_id, rows)


def follow(client, run_id: str, timeout: float | None = None, stack=None, poll: float = 0.5) -> dict:
    """Live progress until the run ends: episodes by state, steps/s, mean reward, failures, stalls.

    Args:
        stack: the embedded `LocalStack` running the run, if any: a dead worker stops
            the follow, and its logs are searched for the reason of a stall.
    """
    from megaflow.cli.progress import follow as show

    try:
        return show(client, run_id, console, timeout=timeout or None, check=stack.check if stack else None,
                    poll=poll, logs=[w.log_path for w in stack.workers] if stack else None)
    except TimeoutError as exc:
        then = (f"workers stopped; the run stays unfinished: `megaflow resume {run_id}` continues it, "
                f"`megaflow cancel {run_id}` ends it") if stack else \
            f"the run goes on: `megaflow status {run_id} --watch` follows it"
        say_error(console, f"{exc}: {then}")
        raise typer.Exit(EXIT_TIMEOUT)
    except RuntimeError as exc:  # a worker of the embedded stack died
        say_error(console, exc)
        raise typer.Exit(1)


def print_results(client, run_id: str, rows: list[dict] | None = None) -> None:
    rows = client.results(run_id) if rows is None else rows
    table = Table(title=f"run {run_id}")
    # Per-test columns only where there are per-test results (SWE tasks): a terminal
    # task's check has none, and the narrow table would cut the states instead.
    graded = any(r.get("per_test") for r in rows)
    cols = ("instance", "sample", "state", "exit", "reward", *(("resolved", "F2P / P2P failing") if graded else ()),
            "steps")
    for col in cols:
        table.add_column(col)
    for r in rows[:200]:
        reward = "" if r["reward"] is None else f"{r['reward']:g}"
        cells = [r["instance_id"], str(r["sample"]), r["state"], r["exit_status"] or "", reward]
        if graded:
            cells += ["" if r.get("resolved") is None else ("yes" if r["resolved"] else "no"),
                      "" if r.get("resolved") is None else f"{len(r['f2p_failure'])} / {len(r['p2p_failure'])}"]
        table.add_row(*cells, str(r["steps"]))
    console.print(table)
    if len(rows) > 200:
        console.print(f"... and {len(rows) - 200} more episodes")
    # Why episodes failed, once per distinct reason (the table has no room for it).
    reasons = Counter((r["exit_status"] or r["state"], " ".join(r["error"].split())[:300]) for r in rows if r["error"])
    for (kind, error), n in reasons.most_common(5):
        console.print(f"[red]{n} × {escape(kind)}:[/red] {escape(error)}", highlight=False, soft_wrap=True)
    summary = client.status(run_id)["summary"]
    if summary:
        states_text = ", ".join(f"{n} {state}" for state, n in sorted(summary.get("by_state", {}).items()))
        mean = summary.get("mean_reward")
        console.print(f"summary: {summary.get('episodes', 0)} episodes ({states_text or 'none'}); "
                      f"mean reward {'-' if mean is None else f'{mean:.3f}'} over finished episodes; "
                      f"solved {summary.get('solved', 0)}", highlight=False)
