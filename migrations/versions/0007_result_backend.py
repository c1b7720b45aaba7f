"""result backend: the chord backend's tables, made by Alembic like every other (issue #17, point 4)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 10:00:00

Until now `megaflow.chord_backend` made these tables itself (``create_all``), so a
database in use already has them: each is created only where it is missing.
"""
import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    if 'megaflow_results' not in existing:
        op.create_table('megaflow_results',
        sa.Column('key', sa.String(length=255), nullable=False),
        sa.Column('value', sa.Text(), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('key')
        )
        op.create_index('ix_megaflow_results_expires_at', 'megaflow_results', ['expires_at'])
    if 'megaflow_chords' not in existing:
        op.create_table('megaflow_chords',
        sa.Column('group_id', sa.String(length=64), nullable=False),
        sa.Column('size', sa.Integer(), nullable=True),
        sa.Column('done', sa.Integer(), nullable=False),
        sa.Column('closed_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('fired_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('group_id')
        )
    if 'megaflow_chord_parts' not in existing:
        op.create_table('megaflow_chord_parts',
        sa.Column('group_id', sa.String(length=64), nullable=False),
        sa.Column('task_id', sa.String(length=64), nullable=False),
        sa.Column('idx', sa.Integer(), nullable=True),
        sa.Column('state', sa.String(length=20), nullable=False),
        sa.Column('result', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('group_id', 'task_id')
        )


def downgrade() -> None:
    op.drop_table('megaflow_chord_parts')
    op.drop_table('megaflow_chords')
    op.drop_index('ix_megaflow_results_expires_at', table_name='megaflow_results')
    op.drop_table('megaflow_results')
