"""Alembic migrations for MegaFlow's state database (applied by `megaflow db upgrade`)."""
