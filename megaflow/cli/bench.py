"""`megaflow bench NAME`: benchmarks that print figures beside a floor measured in the same run."""

from __future__ import annotations

import json

import typer

app = typer.Typer(no_args_is_help=True, help="Benchmarks (run them on your own cluster).")


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
    if as_json:
        print(json.dumps(figures))
    else:
        for k, v in figures.items():
            typer.echo(f"{k:32s} {v}")
