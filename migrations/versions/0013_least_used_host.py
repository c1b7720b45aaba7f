"""megaflow_acquire_least_used: choose the host under the semaphores' lock (PostgreSQL)

Placement read the hosts' loads, then took a slot on the least loaded. Admissions
that ran at the same time all read the same loads and all went for the same host:
six episodes at once on three hosts of three slots filled the first two by name
and left the third idle. This function reads the loads after it holds the
``global`` row (the lock every semaphore change takes first), so each admission
sees the slots the ones before it took.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 20:05:00
"""
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None

# p_keys: taken all or none with the choice (sorted, 'global' included, as megaflow_acquire takes them).
# A choice the holder already has is kept (a retried admission takes no second host).
ACQUIRE_LEAST_USED = """
CREATE OR REPLACE FUNCTION megaflow_acquire_least_used(
    p_keys text[], p_choices text[], p_preferred text[], p_holder text, p_now timestamptz,
    p_expires timestamptz, OUT taken text, OUT full_key text)
LANGUAGE plpgsql AS $$
DECLARE
    v_choice text;
BEGIN
    INSERT INTO semaphores (key, "limit", used) SELECT unnest(p_keys || p_choices), NULL, 0
        ON CONFLICT (key) DO NOTHING;
    PERFORM 1 FROM semaphores WHERE key = 'global' FOR UPDATE;
    FOR v_choice IN
        SELECT s.key FROM semaphores s
         WHERE s.key = ANY(p_choices)
           AND (EXISTS (SELECT 1 FROM semaphore_holders h WHERE h.key = s.key AND h.holder = p_holder)
                OR s."limit" IS NULL OR s.used < s."limit")
         ORDER BY NOT EXISTS (SELECT 1 FROM semaphore_holders h WHERE h.key = s.key AND h.holder = p_holder),
                  NOT (s.key = ANY(coalesce(p_preferred, '{}'::text[]))),
                  CASE WHEN s."limit" IS NULL THEN 0 ELSE s.used::float8 / greatest(1, s."limit") END,
                  s.key
    LOOP
        full_key := megaflow_acquire(p_keys || v_choice, p_holder, p_now, p_expires);
        IF full_key IS NULL THEN
            taken := v_choice;
            RETURN;
        ELSIF full_key <> v_choice THEN
            RETURN;
        END IF;
    END LOOP;
    full_key := NULL;
END $$;
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(ACQUIRE_LEAST_USED)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP FUNCTION IF EXISTS megaflow_acquire_least_used(text[], text[], text[], text, timestamptz, "
               "timestamptz)")
