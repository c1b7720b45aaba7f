"""The RL loop's columns: policy versions, prompt token ids, tool calls (issues #18, #19)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 13:05:00

* `policy_versions`: every policy a trainer published (`client.publish_policy`);
  model workers switch to the newest at a safe point between requests.
* `steps.policy_version`: the version that sampled the turn (bounded staleness and
  RL batches read it); `steps.prompt_token_ids`: the prompt exactly as the backend
  tokenized it, where it says (a trainer must score the very same ids).
* `steps.tool_calls`: the OpenAI-shaped tool calls of a turn (native tool calling).
"""
import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'policy_versions',
        sa.Column('policy', sa.String(200), primary_key=True),
        sa.Column('version', sa.Integer(), primary_key=True),
        sa.Column('path', sa.Text(), nullable=False),
        sa.Column('kind', sa.String(10), nullable=False),
        sa.Column('meta', sa.JSON(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    )
    op.add_column('steps', sa.Column('policy_version', sa.Integer(), nullable=True))
    op.add_column('steps', sa.Column('prompt_token_ids', sa.JSON(), nullable=True))
    op.add_column('steps', sa.Column('tool_calls', sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column('steps', 'tool_calls')
    op.drop_column('steps', 'prompt_token_ids')
    op.drop_column('steps', 'policy_version')
    op.drop_table('policy_versions')
