"""finished_at indexes: the metrics exporter reads only rows newer than its high-water mark (issue #21, point 5)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 10:25:00

`megaflow metrics` keeps cumulative counters by aggregating, on each scrape, the
hops and episodes finished since its last mark; `megaflow scale` reads the hops
of its window. Without an index each is a scan of the whole table.
"""
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_hops_finished_at', 'hops', ['finished_at'])
    op.create_index('ix_episodes_finished_at', 'episodes', ['finished_at'])


def downgrade() -> None:
    op.drop_index('ix_episodes_finished_at', table_name='episodes')
    op.drop_index('ix_hops_finished_at', table_name='hops')
