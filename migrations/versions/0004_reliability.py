"""reliability: delivery counts (poison messages), run generations and episode attempts (resume)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 00:30:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('deliveries',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('task_name', sa.String(length=100), nullable=False),
    sa.Column('task_id', sa.String(length=64), nullable=False),
    sa.Column('count', sa.Integer(), nullable=False),
    sa.Column('first_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )
    with op.batch_alter_table('runs') as batch:
        batch.add_column(sa.Column('generation', sa.Integer(), nullable=False, server_default='0'))
    with op.batch_alter_table('episodes') as batch:
        batch.add_column(sa.Column('attempt', sa.Integer(), nullable=False, server_default='0'))
        batch.add_column(sa.Column('retry_of', sa.String(length=32), nullable=True))
        batch.add_column(sa.Column('superseded_by', sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('episodes') as batch:
        batch.drop_column('superseded_by')
        batch.drop_column('retry_of')
        batch.drop_column('attempt')
    with op.batch_alter_table('runs') as batch:
        batch.drop_column('generation')
    op.drop_table('deliveries')
