"""How CLI commands turn expected errors into a message and an exit code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console


@contextmanager
def exit_on_errors(console: Console) -> Iterator[None]:
    """A missing optional package exits 2, an unknown run exits 1; both with one red line."""
    try:
        yield
    except ImportError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    except LookupError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
