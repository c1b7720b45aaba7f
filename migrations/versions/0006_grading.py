"""grading evidence per episode: per-test results and the test log (issue #15, point 2)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 07:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("episodes", sa.Column("grading", sa.JSON(), nullable=True))
    op.add_column("episodes", sa.Column("test_log", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("episodes", "test_log")
    op.drop_column("episodes", "grading")
