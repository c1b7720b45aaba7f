"""`megaflow export RUN --format jsonl|parquet|swebench|minisweagent|swebench-report --out PATH`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

from megaflow.cli.errors import exit_on_errors

console = Console()


class Format(str, Enum):
    jsonl = "jsonl"
    parquet = "parquet"
    swebench = "swebench"
    minisweagent = "minisweagent"
    swebench_report = "swebench-report"


def register(app: typer.Typer) -> None:
    app.command(name="export")(export)


def export(
    run_id: str = typer.Argument(..., help="The run to export."),
    fmt: Format = typer.Option(Format.jsonl, "--format", "-f", help="Output format."),
    out: Path = typer.Option(..., "--out", "-o", help="Output file (a directory for minisweagent and swebench-report)."),
    tokenizer: str = typer.Option(None, help="Parquet: Hugging Face tokenizer for prompt token ids and loss masks."),
    model_name: str = typer.Option(None, help="swebench/minisweagent: model name (default: as the backend reported)."),
) -> None:
    """Export a run's episodes: JSONL or Parquet for trainers, SWE-bench predictions, mini-swe-agent trajectories, SWE-bench report.json per instance."""
    from megaflow.client import Client
    from megaflow.export import HFChatTokenizer

    with exit_on_errors(console):
        tok = HFChatTokenizer(tokenizer) if tokenizer else None
        n = Client().export(run_id, fmt.value, out, tokenizer=tok, model_name=model_name)
    console.print(f"{n} records written to {out}")
