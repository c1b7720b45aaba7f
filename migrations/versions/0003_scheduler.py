"""scheduler: env host registry, distributed semaphores, quotas, episode admission

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 23:50:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('hosts',
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('capacity', sa.Integer(), nullable=False),
    sa.Column('images', sa.JSON(), nullable=False),
    sa.Column('state', sa.String(length=20), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('semaphores',
    sa.Column('key', sa.String(length=300), nullable=False),
    sa.Column('limit', sa.Integer(), nullable=True),
    sa.Column('used', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )
    op.create_table('semaphore_holders',
    sa.Column('key', sa.String(length=300), nullable=False),
    sa.Column('holder', sa.String(length=64), nullable=False),
    sa.Column('acquired_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('key', 'holder')
    )
    op.create_index('ix_semaphore_holders_holder', 'semaphore_holders', ['holder'])
    op.create_index('ix_semaphore_holders_expires_at', 'semaphore_holders', ['expires_at'])
    op.create_table('quotas',
    sa.Column('scope', sa.String(length=20), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('max_concurrent', sa.Integer(), nullable=True),
    sa.Column('max_total', sa.Integer(), nullable=True),
    sa.Column('admitted_total', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('scope', 'name')
    )
    with op.batch_alter_table('episodes') as batch:
        batch.add_column(sa.Column('wait_reason', sa.String(length=200), nullable=True))
        batch.add_column(sa.Column('parked', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('admitted_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('episodes') as batch:
        batch.drop_column('admitted_at')
        batch.drop_column('parked')
        batch.drop_column('wait_reason')
    op.drop_table('quotas')
    op.drop_index('ix_semaphore_holders_expires_at', table_name='semaphore_holders')
    op.drop_index('ix_semaphore_holders_holder', table_name='semaphore_holders')
    op.drop_table('semaphore_holders')
    op.drop_table('semaphores')
    op.drop_table('hosts')
