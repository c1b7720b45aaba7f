"""How CLI commands turn expected errors into a message and an exit code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.text import Text


def say_error(console: Console, message) -> None:
    """One red line, printed as it is: an error's text is never read as markup (`megaflow[ops]` stays)."""
    console.print(Text(str(message), style="red"), highlight=False, soft_wrap=True)


@contextmanager
def exit_on_errors(console: Console) -> Iterator[None]:
    """A missing optional package exits 2, an unknown run exits 1; both with one red line."""
    try:
        yield
    except ImportError as exc:
        say_error(console, exc)
        raise typer.Exit(2) from exc
    except LookupError as exc:
        say_error(console, exc)
        raise typer.Exit(1) from exc
