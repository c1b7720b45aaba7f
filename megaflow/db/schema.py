"""Apply the schema: Alembic migrations (``megaflow db upgrade``)."""

from __future__ import annotations

from pathlib import Path


def alembic_config(url: str):
    from alembic.config import Config

    import migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at `url` to `revision`: every table, the result backend's too."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)
