"""semaphore functions: acquire and release as one server-side call (PostgreSQL)

Every admission and every episode end changes the `global` semaphore row (and its
host's). Taken statement by statement inside a decision's transaction, that row
stays locked for the rest of the transaction, client round trips included: under
load every admission queued on it. As one call in its own transaction, the rows are
locked only while the server runs it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 09:45:00
"""
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

# Rows are locked global first, then by key: the order every semaphore change keeps.
ACQUIRE = """
CREATE OR REPLACE FUNCTION megaflow_acquire(p_keys text[], p_holder text, p_now timestamptz,
                                            p_expires timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_new text[];
    v_key text;
    v_full text;
BEGIN
    INSERT INTO semaphores (key, "limit", used) SELECT unnest(p_keys), NULL, 0 ON CONFLICT (key) DO NOTHING;
    BEGIN
        WITH ins AS (
            INSERT INTO semaphore_holders (key, holder, acquired_at, expires_at)
            SELECT unnest(p_keys), p_holder, p_now, p_expires
            ON CONFLICT DO NOTHING RETURNING key)
        SELECT array_agg(key ORDER BY key <> 'global', key) INTO v_new FROM ins;
        FOREACH v_key IN ARRAY coalesce(v_new, '{}'::text[]) LOOP
            UPDATE semaphores SET used = used + 1
             WHERE key = v_key AND ("limit" IS NULL OR used < "limit");
            IF NOT FOUND THEN
                v_full := v_key;
                RAISE EXCEPTION USING ERRCODE = 'MF001';
            END IF;
        END LOOP;
    EXCEPTION WHEN SQLSTATE 'MF001' THEN
        -- All or none: the block's holder rows and counts are rolled back.
        RETURN v_full;
    END;
    RETURN NULL;
END $$;
"""

RELEASE = """
CREATE OR REPLACE FUNCTION megaflow_release(p_holder text, p_keys text[] DEFAULT NULL) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
    v_keys text[];
    v_key text;
BEGIN
    WITH d AS (DELETE FROM semaphore_holders
                WHERE holder = p_holder AND (p_keys IS NULL OR key = ANY(p_keys)) RETURNING key)
    SELECT array_agg(key ORDER BY key <> 'global', key) INTO v_keys FROM d;
    FOREACH v_key IN ARRAY coalesce(v_keys, '{}'::text[]) LOOP
        UPDATE semaphores SET used = used - 1 WHERE key = v_key AND used > 0;
    END LOOP;
    RETURN coalesce(v_keys, '{}'::text[]);
END $$;
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(ACQUIRE)
    op.execute(RELEASE)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP FUNCTION IF EXISTS megaflow_acquire(text[], text, timestamptz, timestamptz)")
    op.execute("DROP FUNCTION IF EXISTS megaflow_release(text, text[])")
