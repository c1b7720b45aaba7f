"""`megaflow db …`: schema management."""

from __future__ import annotations

import typer

from megaflow.config import Settings

app = typer.Typer(no_args_is_help=True, help="State database.")


@app.command()
def upgrade(revision: str = typer.Argument("head")) -> None:
    """Apply Alembic migrations to MEGAFLOW_DATABASE_URL (or the embedded SQLite)."""
    from megaflow.db.schema import upgrade as do_upgrade

    url = Settings().resolved_database_url()
    do_upgrade(url, revision)
    typer.echo(f"database at {redact(url)} is at {revision}")


def redact(url: str) -> str:
    """A URL with its password hidden, for printing."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - printing must never fail
        return "<url>"
