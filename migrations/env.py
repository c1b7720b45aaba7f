"""Alembic environment: MegaFlow's models; the result backend's own tables are left alone."""

from __future__ import annotations

from alembic import context

from megaflow.db.engine import make_engine
import megaflow.ratelimit.sql  # noqa: F401 - registers the rate-limit tables on Base.metadata
from megaflow.db.models import Base

config = context.config
target_metadata = Base.metadata


def include_object(obj, name, type_, reflected, compare_to):
    # megaflow_* tables belong to the Celery result backend, which creates its own.
    return not (type_ == "table" and name.startswith("megaflow_"))


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, include_object=include_object)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata,
                          include_object=include_object, render_as_batch=url.startswith("sqlite"))
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
