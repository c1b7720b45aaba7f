"""The tools a CLI agent's program offered with each model call (issue #19.3)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 14:25:00

* `steps.tools`, `steps.tool_choice`: the request's tools (OpenAI shape) and tool
  choice, recorded by the model proxy per call; the model hop offers these to the
  model instead of the run's scaffold's (None: the scaffold's, as before).
"""
import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('steps', sa.Column('tools', sa.JSON(), nullable=True))
    op.add_column('steps', sa.Column('tool_choice', sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column('steps', 'tool_choice')
    op.drop_column('steps', 'tools')
