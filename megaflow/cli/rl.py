"""`megaflow batches RUN --groups G [--out DIR] [--ack]`: a run's RL batches as JSONL, as they become ready."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from megaflow.cli.errors import exit_on_errors, say_error

console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    app.command(name="batches")(batches)


def batches(
    run_id: Annotated[str, typer.Argument(help="The run whose batches to take.")],
    groups: Annotated[int | None, typer.Option(
        "--groups", "-g", min=1, help="Complete groups per batch (the last may hold fewer); "
        "default: the run's rl.groups_per_batch.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o",
                                             help="Directory for one JSONL file per batch; default: stdout.")] = None,
    ack: Annotated[bool, typer.Option("--ack", help="Acknowledge each batch once written: it is never handed out "
                                      "again. Without it the batches go to the next consumer once this one exits.")]
    = False,
    tokenizer: Annotated[str | None, typer.Option(
        help="Hugging Face tokenizer for turns whose backend recorded no prompt ids.")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout",
                                                  help="Give up after this many seconds without a batch.")] = None,
) -> None:
    """Write a run's complete rollout groups, G at a time, as their group callbacks close them: one JSON line per episode (token ids per turn, input_ids, loss_mask, behaviour logprobs, reward, advantage, policy versions), until the run has ended and every group was handed out. Episodes without a reward (infra failures) are left out and counted."""
    from megaflow.client import Client
    from megaflow.rl.handoff import HandoffLostError

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    n = 0
    with exit_on_errors(console):
        try:
            with Client().batches(run_id, groups, tokenizer=tokenizer, timeout_s=timeout) as stream:
                for n, batch in enumerate(stream, 1):
                    lines = "".join(json.dumps({"run_id": batch.run_id, "batch_id": batch.batch_id,
                                                **vars(ep)}) + "\n" for ep in batch.episodes)
                    where = _write(out, n, batch.batch_id, lines)
                    if ack:
                        batch.ack()
                    console.print(f"batch {n} ({batch.batch_id}): {len(batch.group_ids)} groups, "
                                  f"{len(batch.episodes)} episodes, {len(batch.dropped)} without a reward left out"
                                  f"{', handed out again' if batch.handouts > 1 else ''}{where}")
        except (ValueError, TimeoutError, HandoffLostError) as exc:
            say_error(console, exc)
            raise typer.Exit(1) from exc
    console.print(f"{n} batches{' acknowledged' if ack else ' (not acknowledged)'}")


def _write(out: Path | None, n: int, batch_id: str, lines: str) -> str:
    if out is None:
        sys.stdout.write(lines)
        sys.stdout.flush()
        return ""
    path = out / f"batch-{n:05d}-{batch_id}.jsonl"
    # Whole or not at all: a batch is acknowledged only after its file is complete.
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(lines)
    tmp.replace(path)
    return f" -> {path}"
