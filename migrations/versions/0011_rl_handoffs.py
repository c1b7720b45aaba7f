"""RL batches' hand-off ledger: which consumer holds which ready group, and what it acknowledged (issue #18.1)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 13:05:00

* `rl_handoffs`: one row per group handed out in a batch (`client.batches`). A row
  whose `acked_at` is set is never handed out again; one whose consumer died (its
  advisory lock is free) is handed out again, as the same batch, to the next consumer.
"""
import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'rl_handoffs',
        sa.Column('group_id', sa.String(32), sa.ForeignKey('groups.id', ondelete='CASCADE'), primary_key=True),
        sa.Column('run_id', sa.String(32), sa.ForeignKey('runs.id', ondelete='CASCADE'), nullable=False),
        sa.Column('batch_id', sa.String(32), nullable=False),
        sa.Column('consumer', sa.BigInteger(), nullable=False),
        sa.Column('handouts', sa.Integer(), nullable=False, server_default='1'),
        sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('acked_at', sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index('ix_rl_handoffs_run_id', 'rl_handoffs', ['run_id'])
    op.create_index('ix_rl_handoffs_batch_id', 'rl_handoffs', ['batch_id'])


def downgrade() -> None:
    op.drop_index('ix_rl_handoffs_batch_id', table_name='rl_handoffs')
    op.drop_index('ix_rl_handoffs_run_id', table_name='rl_handoffs')
    op.drop_table('rl_handoffs')
