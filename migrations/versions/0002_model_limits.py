"""model limits: tier-1 token buckets and leased in-flight slots (megaflow.ratelimit.sql)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 21:42:15.511722
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('model_buckets',
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('requests', sa.Float(), nullable=False),
    sa.Column('tokens', sa.Float(), nullable=False),
    sa.Column('updated', sa.Float(), nullable=False),
    sa.Column('latency_s', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )
    op.create_table('model_slots',
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('holder', sa.String(length=200), nullable=False),
    sa.Column('started', sa.Float(), nullable=False),
    sa.Column('expires', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('key', 'holder')
    )


def downgrade() -> None:
    op.drop_table('model_slots')
    op.drop_table('model_buckets')
