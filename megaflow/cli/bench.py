"""`megaflow bench NAME`: benchmarks that print figures beside a floor measured in the same run."""

from __future__ import annotations

import json

import typer

app = typer.Typer(no_args_is_help=True, help="Benchmarks (run them on your own cluster).")


def _print_figures(figures: dict, as_json: bool) -> None:
    """One JSON object, or one aligned line per figure."""
    if as_json:
        print(json.dumps(figures))
        return
    width = max(map(len, figures), default=0) + 2
    for k, v in figures.items():
        typer.echo(f"{k:{width}s} {v}")


@app.command()
def pipeline(
    episodes: int = typer.Option(200, help="Episodes in the pipeline run."),
    steps: int = typer.Option(3, help="Commands per episode (plus a submit turn)."),
    chord_size: int = typer.Option(1024, help="Members of the chord whose close is timed."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    compare: list[str] = typer.Option(
        [], "--compare", help="NAME=RESULT_BACKEND_URL: also time the chord on that backend (repeatable), "
        "e.g. redis=redis://127.0.0.1:6379/1 or stockdb=db+postgresql+psycopg2://…"),
) -> None:
    """Pipeline throughput vs raw Celery and raw AMQP on the same broker, and chord close latency."""
    from megaflow.bench.pipeline import run_pipeline_bench

    backends = dict(item.split("=", 1) for item in compare)
    figures = run_pipeline_bench(episodes=episodes, steps=steps, chord_size=chord_size, compare=backends)
    _print_figures(figures, as_json)


@app.command()
def model(
    concurrency: int = typer.Option(8, help="Concurrent requests (and the batch size)."),
    max_tokens: int = typer.Option(32, help="Completion tokens per request."),
    rounds: int = typer.Option(2, help="Timed rounds per phase, after one warm-up round."),
    http_requests: int = typer.Option(50, help="Requests per side of the HTTP overhead figure."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Model Service overhead on SmolLM2: in-process vs through the model queue, and our HTTP client vs raw httpx."""
    from megaflow.bench.model import run_model_bench

    figures = run_model_bench(concurrency=concurrency, max_tokens=max_tokens, rounds=rounds,
                              http_requests=http_requests)
    if as_json:
        print(json.dumps(figures))
        return
    typer.echo(f"direct generate()      {figures['direct_tokens_per_s']:10.1f} tokens/s "
               f"({figures['direct_tokens']} tokens in {figures['direct_seconds']}s)")
    typer.echo(f"through the model queue {figures['queue_tokens_per_s']:9.1f} tokens/s "
               f"({figures['queue_tokens']} tokens in {figures['queue_seconds']}s)")
    typer.echo(f"queue / direct          {figures['ratio_queue_to_direct']:9.3f}")
    typer.echo(f"HTTP backend overhead   {figures['http_overhead_ms']:9.2f} ms/request "
               f"(ours {figures['http_ours_median_ms']} ms, raw httpx {figures['http_raw_median_ms']} ms, "
               f"medians of {figures['http_requests']})")
    typer.echo(f"  client CPU time only  {figures['http_overhead_cpu_ms']:9.3f} ms/request")


@app.command()
def env(
    n: int = typer.Option(40, "--n", min=1, help="Samples per timed phase."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    desktop: bool = typer.Option(False, "--desktop", help="Instead: desktop sandboxes (create with the session up, "
                                 "screenshot round trip vs scrot in the same container, actions/s, memory)."),
    creates: int = typer.Option(5, "--creates", min=1, help="--desktop: desktops created one at a time, timed."),
    cli: bool = typer.Option(False, "--cli", help="Instead: the CLI agents' model proxy (overhead per call against "
                             "the same server direct; CLI episodes in flight and the memory they use)."),
    calls: int = typer.Option(20, "--calls", min=3, help="--cli: paired calls timed (the first two warm up)."),
    in_flight: int = typer.Option(1000, "--in-flight", min=1, help="--cli: CLI episodes with a call open at once."),
) -> None:
    """Sandbox costs on the Docker engine: create, warm-pool acquire, concurrent creates, exec vs raw SDK."""
    from megaflow.bench.env import format_figures, run_env_bench

    if desktop:
        from megaflow.bench.desktop import format_desktop_figures, run_desktop_bench

        figures = run_desktop_bench(n=max(n, 2), creates=creates)
        if as_json:
            print(json.dumps(figures))
            return
        for line in format_desktop_figures(figures):
            typer.echo(line)
        return
    if cli:
        from megaflow.bench.cli_proxy import format_cli_figures, run_cli_bench

        figures = run_cli_bench(calls=calls, in_flight=in_flight)
        if as_json:
            print(json.dumps(figures))
            return
        for line in format_cli_figures(figures):
            typer.echo(line)
        return
    figures = run_env_bench(n=n)
    if as_json:
        print(json.dumps(figures))
        return
    for line in format_figures(figures):
        typer.echo(line)


@app.command()
def swe(
    tasks: str = typer.Option("examples/tasks/swe.yaml", help="SWE tasks (their images are built if missing)."),
    concurrency: int = typer.Option(4, help="Instances at once, for MegaFlow and the plain harness alike."),
    repeat: int = typer.Option(1, help="Rounds, plain and MegaFlow interleaved."),
    rollouts: int = typer.Option(2, help="Times each instance is graded per round (a round's tail, when fewer "
                                 "than --concurrency instances are left, weighs less with more)."),
    find_links: str = typer.Option(None, "--find-links", help="Wheelhouse for task environments (offline hosts)."),
    cpus: float = typer.Option(1.0, help="CPU limit of each sandbox and each plain container (the sandbox default)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """SWE instances graded per hour on Docker vs a plain docker-run/git-apply/test script, and phase p50s."""
    from megaflow.bench.swe import run_swe_bench

    figures = run_swe_bench(tasks, concurrency=concurrency, repeat=repeat, rollouts=rollouts, find_links=find_links,
                            cpus=cpus)
    _print_figures(figures, as_json)


@app.command()
def scale(
    sizes: str = typer.Option("1,10,100,1000,10000", help="Episode counts N, comma-separated, run in this order "
                              "(makespan each; steady-state figures from the largest)."),
    steps: int = typer.Option(8, help="Commands per episode (each a model call + a command), plus a submit turn."),
    model_latency: float = typer.Option(120.0, help="Simulated seconds per model call (broker-side delay)."),
    exec_latency: float = typer.Option(20.0, help="Simulated seconds per command (broker-side delay)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Episodes in flight vs Little's law, hop delay, worker memory, and makespan for N = 1 … 10,000."""
    from megaflow.bench.scale import run_scale_bench

    figures = run_scale_bench(sizes=[int(x) for x in sizes.split(",")], steps=steps, model_latency_s=model_latency,
                              exec_latency_s=exec_latency, progress=lambda line: typer.echo(line, err=True))
    _print_figures(figures, as_json)


@app.command()
def load(
    episodes: int = typer.Option(1000, help="Episodes in the run."),
    steps: int = typer.Option(3, help="Commands per episode (plus a submit turn)."),
    burners: int = typer.Option(None, help="CPU burners beside the run (default: one per core)."),
    rabbitmq_log: str = typer.Option("/var/log/rabbitmq/*.log", help="RabbitMQ's log files (a glob), read for "
                                     "the connections it closed."),
    dump_stalls_s: float = typer.Option(None, help="Dump every worker's threads (py-spy) when no hop has started "
                                        "for this long."),
    timeout_s: float = typer.Option(3600.0, help="Give up on the run after this long."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """A run on a saturated machine: missed heartbeats and ack errors counted from RabbitMQ's and the workers' logs."""
    from megaflow.bench.load import run_load_bench

    figures = run_load_bench(episodes=episodes, steps=steps, burners=burners, timeout_s=timeout_s,
                             rabbitmq_logs=rabbitmq_log, dump_stalls_s=dump_stalls_s)
    _print_figures(figures, as_json)


@app.command()
def chaos(
    episodes: int = typer.Option(500, help="Episodes in each run."),
    kill_every_s: str = typer.Option("10", help="Seconds between two worker SIGKILLs: N (N ±30%) or LO-HI (uniform), "
                                     "e.g. 8 or 2-5."),
    sandbox: str = typer.Option("local", help="Sandbox backend: local (bubblewrap) or docker."),
    rabbitmq_restart: str = typer.Option(
        None, help="Command that restarts RabbitMQ once mid-run ('' to skip). Default: "
        "'rabbitmqctl shutdown && rabbitmq-server -detached'."),
    postgres_restart: str = typer.Option(
        None, help="Command that restarts PostgreSQL once mid-run ('' to skip). Default: "
        "'pg_ctlcluster --skip-systemctl-redirect <version> main restart'."),
    timeout_s: float = typer.Option(3600.0, help="Give up on a run after this long; what is unfinished is lost."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Afterwards, `resume` the infra-failed episodes."),
    seed: int = typer.Option(None, help="Seed of the fault schedule (one run)."),
    seeds: str = typer.Option(None, help="Comma-separated seeds, e.g. 1,2,3: one run each, and a summary of "
                              "which targets held in every run."),
    capacity: int = typer.Option(None, help="The env host's sandbox capacity (default MEGAFLOW_SANDBOX_CAPACITY); "
                                 "peak_sandboxes, counted from outside, is held against it."),
    stall_s: float = typer.Option(120.0, help="A run in which nothing moved for this long, with nothing queued, "
                                  "is over: its unfinished episodes are lost."),
    recover_s: float = typer.Option(420.0, help="After a stall, with the kills stopped, how long to wait for the "
                                    "platform's own repairs to finish the lost episodes (reported apart)."),
    reap_interval_s: float = typer.Option(10.0, help="The workers' own reaping interval."),
    reap_wait_s: float = typer.Option(200.0, help="After the run, how long the workers may reap before leftovers "
                                      "count as leaked (the reaper spares sandboxes for 120 s)."),
    keep: bool = typer.Option(False, help="Keep the private vhost, database and data directory."),
    private_services: bool = typer.Option(
        False, help="Start a RabbitMQ node and a PostgreSQL server of the bench's own and restart those, "
        "leaving the machine's services alone (needs root)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """A run under fire: workers killed, RabbitMQ and PostgreSQL restarted; lost, duplicated, leaked, peak sandboxes."""
    from megaflow.bench.chaos import run_chaos_bench, run_chaos_seeds
    from megaflow.bench.faults import DEFAULT_POSTGRES_RESTART, DEFAULT_RABBITMQ_RESTART

    kwargs = dict(
        episodes=episodes, kill_every_s=kill_every_s, sandbox=sandbox,
        rabbitmq_restart=DEFAULT_RABBITMQ_RESTART if rabbitmq_restart is None else rabbitmq_restart or None,
        postgres_restart=DEFAULT_POSTGRES_RESTART if postgres_restart is None else postgres_restart or None,
        timeout_s=timeout_s, resume=resume, keep=keep, private_services=private_services, capacity=capacity,
        stall_s=stall_s, recover_s=recover_s, reap_interval_s=reap_interval_s, reap_wait_s=reap_wait_s)
    if seeds:
        figures = run_chaos_seeds([int(x) for x in seeds.split(",")], progress=lambda line: typer.echo(line, err=True),
                                  **kwargs)
        if as_json:
            print(json.dumps(figures, default=str))
            return
        for row in figures["per_seed"]:
            typer.echo(" ".join(f"{k}={v}" for k, v in row.items()))
        for name, held in figures["targets_held"].items():
            typer.echo(f"{name:32s} {'held in every run' if held else 'MISSED'}")
        return
    figures = run_chaos_bench(seed=seed, **kwargs)
    if as_json:
        print(json.dumps(figures, default=str))
        return
    _print_figures(figures, as_json)


@app.command()
def rl(
    steps: int = typer.Option(5, min=2, help="Training steps per mode."),
    groups: int = typer.Option(1, min=1, help="Groups per batch."),
    rollouts: int = typer.Option(4, min=1, help="Episodes per group."),
    model: str = typer.Option("smollm2", help="The trained model: smollm2 (SmolLM2-135M, LoRA, CPU) or tiny."),
    latency_s: float = typer.Option(None, help="Scripted latency per model call; default: calibrated so a "
                                    "batch's rollout takes about one train step."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """The trainer's idle fraction in sync and async (max_staleness 1, 2) mode; rollout, train, weight-sync seconds per step."""
    from megaflow.bench.rl import run_rl_bench

    _print_figures(run_rl_bench(steps=steps, groups=groups, rollouts=rollouts, model=model, latency_s=latency_s),
                   as_json)
