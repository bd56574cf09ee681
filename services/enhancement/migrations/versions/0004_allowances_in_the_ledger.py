"""allowances in the ledger: the month's included enhancements are a ledger allowance
(ledger migration 0008, `ledger.allowances`), drawn per task; the counter goes

The current month's counters are carried into the ledger first, so nobody's month
starts over at the upgrade: per counter, an allowance granted `included` with `used`
units, each recorded as the ledger records it (a `grant` entry; a draw per used unit):
the included tasks still unsettled get an active draw under their own reference
(`enhancement:<task id>`, so their settlement confirms or returns it as any other's),
the rest confirmed draws `carried:<user>:<period>:<n>`. Only where the ledger has its
allowance tables (ledger migration 0008, which runs first) and no row for that user
and month yet. Past months' counters are not carried: those months have ended.

The 90 % alert stays once per user and month through its dedupe key in `alerts`
(`allowance_high:<user>:<period>`), which never needed the counter's flag.
Downgrading recreates the table empty (the months' counts are in the ledger).

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


ACTOR = "migration:enhancement-0004"

CARRY = f"""
WITH src AS (
  SELECT user_id, period, included, LEAST(used, included) AS used
    FROM enhancement.allowances
   WHERE included > 0
     AND period = to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM')
), ins AS (
  INSERT INTO ledger.allowances (user_id, kind, period, granted, used, expires_at)
  SELECT user_id, 'enhancement', period, included, used,
         (to_date(period || '-01', 'YYYY-MM-DD') + interval '1 month')::timestamp
           AT TIME ZONE 'UTC'
    FROM src
  ON CONFLICT DO NOTHING
  RETURNING user_id, period, granted, used
), open_tasks AS (
  SELECT t.id, t.user_id, t.allowance_period AS period,
         row_number() OVER (PARTITION BY t.user_id ORDER BY t.created_at, t.id) AS n
    FROM enhancement.tasks t JOIN ins ON (ins.user_id, ins.period) = (t.user_id,
                                                                      t.allowance_period)
   WHERE t.settled_at IS NULL
), active AS (
  SELECT o.id, o.user_id, o.period FROM open_tasks o JOIN ins USING (user_id)
   WHERE o.n <= ins.used
), carried AS (
  SELECT ins.user_id, ins.period,
         'carried:' || ins.user_id || ':' || ins.period || ':' || s AS reference
    FROM ins, generate_series(
      1, ins.used - (SELECT count(*) FROM active a WHERE a.user_id = ins.user_id)::int) s
), draws AS (
  INSERT INTO ledger.allowance_draws (reference, user_id, kind, period, owner, status,
                                      expires_at, resolved_at)
  SELECT 'enhancement:' || id, user_id, 'enhancement', period, 'service:enhancement',
         'active', clock_timestamp() + interval '1 hour', NULL FROM active
  UNION ALL
  SELECT reference, user_id, 'enhancement', period, 'service:enhancement', 'confirmed',
         clock_timestamp(), clock_timestamp() FROM carried
  RETURNING reference, user_id, period, status
)
INSERT INTO ledger.allowance_entries (user_id, kind, period, entry, granted_delta,
                                      used_delta, reference, actor)
SELECT user_id, 'enhancement', period, 'grant', granted, 0, 'carried', '{ACTOR}' FROM ins
UNION ALL
SELECT user_id, 'enhancement', period, 'draw', 0, 1, reference, '{ACTOR}' FROM draws
UNION ALL
SELECT user_id, 'enhancement', period, 'confirm', 0, 0, reference, '{ACTOR}' FROM draws
 WHERE status = 'confirmed'
"""


def upgrade() -> None:
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT to_regclass('ledger.allowances')")).scalar() is not None:
        op.execute(CARRY)
    op.drop_table("allowances", schema="enhancement")


def downgrade() -> None:
    op.create_table(
        "allowances",
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("period", sa.Text(), nullable=False),
        sa.Column("included", sa.Integer(), nullable=False),
        sa.Column("used", sa.Integer(), server_default="0", nullable=False),
        sa.Column("alerted", sa.Boolean(), server_default="f", nullable=False),
        sa.CheckConstraint(
            "used >= 0 AND used <= included", name=op.f("ck_allowances_used_in_range")
        ),
        sa.PrimaryKeyConstraint("user_id", "period", name=op.f("pk_allowances")),
        schema="enhancement",
    )
