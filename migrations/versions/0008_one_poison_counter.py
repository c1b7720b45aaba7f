"""one poison counter: the hops ledger's attempts column goes; the deliveries table counts (issue #17, point 4)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 10:30:00

Redelivered messages are counted once, in ``deliveries`` (`megaflow.delivery`), which
enforces ``Settings.hop_max_deliveries``. The ledger's ``attempts`` counted claims a
second way and nothing enforced it.
"""
import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('hops') as batch:
        batch.drop_column('attempts')


def downgrade() -> None:
    with op.batch_alter_table('hops') as batch:
        batch.add_column(sa.Column('attempts', sa.Integer(), nullable=False, server_default='1'))
