"""`megaflow train SPEC`: the reference GRPO/GSPO trainer on a run's batches (megaflow.rl.trainer)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from megaflow.cli.errors import exit_on_errors, say_error

console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    app.command(name="train")(train)


def train(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Train spec (YAML): run or run_id, algorithm, "
                                              "lora or full weights, lr, clip_eps, steps, output_dir.")],
    tokenizer: Annotated[str | None, typer.Option(
        help="Hugging Face tokenizer for turns whose backend recorded no prompt ids.")] = None,
) -> None:
    """Train on a run's batches as they become ready: one clipped policy-gradient step per batch (GRPO or GSPO on the recorded token ids and behaviour logprobs), then the new policy is saved, published to the model workers and the batch acknowledged. Prints one line per step."""
    from megaflow.client import Client
    from megaflow.errors import SpecError
    from megaflow.rl.handoff import HandoffLostError
    from megaflow.rl.train_spec import TrainSpec
    from megaflow.rl.trainer import train as run_training

    with exit_on_errors(console):
        try:
            spec = TrainSpec.load(spec_path)
        except SpecError as exc:
            say_error(console, exc)
            raise typer.Exit(2) from exc
        try:
            logs = run_training(spec, Client(), on_step=_print, tokenizer=tokenizer)
        except SpecError as exc:  # the run spec it names
            say_error(console, exc)
            raise typer.Exit(2) from exc
        except (ValueError, TimeoutError, HandoffLostError) as exc:
            say_error(console, exc)
            raise typer.Exit(1) from exc
    console.print(f"{len(logs)} steps; checkpoints and metrics.jsonl in {spec.output_dir}")


def _print(log) -> None:
    console.print(
        f"step {log.step}: loss {log.loss:+.4f}  reward {log.mean_reward:+.3f}  format errors "
        f"{log.format_error_rate:.0%}  policy v{log.policy_version} (sampled by v{log.sampled_versions})  "
        f"rollout {log.rollout_s:.1f}s train {log.train_s:.1f}s sync {log.sync_s:.1f}s")
