"""money rules both ways: per-lot draws, debt, clawback caps, authority (holds.owner,
app_links, audit_log), isolated batch items; functions in sql/0004_money_rules.sql

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

from services.kit.migrations import execute_script

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"

# Backfill of the per-lot columns for lots that existed before per-lot records:
# what expired (grant_expiry journal entries), what settled debt at grant time (the
# grant's `debt` posting), and the rest of what the lot gave out as `legacy_milli`.
BACKFILL = """
UPDATE ledger.grants g SET expired_milli = e.amount
  FROM (SELECT substr(reference, 7)::bigint AS grant_id, SUM(amount_milli) AS amount
          FROM ledger.transactions WHERE kind = 'grant_expiry' AND reference LIKE 'grant:%'
         GROUP BY 1) e
 WHERE e.grant_id = g.id;
UPDATE ledger.grants g SET settled_milli = p.amount_milli
  FROM ledger.postings p WHERE p.tx_id = g.tx_id AND p.account = 'debt' AND p.amount_milli > 0;
UPDATE ledger.grants g
   SET legacy_milli = g.amount_milli - g.remaining_milli - g.expired_milli - g.settled_milli
                      - COALESCE((SELECT SUM(ha.amount_milli) FROM ledger.hold_allocations ha
                                    JOIN ledger.holds h ON h.id = ha.hold_id
                                   WHERE ha.grant_id = g.id AND h.status = 'active'), 0);
UPDATE ledger.holds SET owner = 'app:' || app;
"""

# Refuse a downgrade that would lose per-lot records or forgive debt (the 0003
# functions ignore both): say what is in the way instead.
GUARD = """
DO $$
DECLARE
  v_what text;
BEGIN
  SELECT string_agg(what, ', ') INTO v_what FROM (
    SELECT 'outstanding debt' AS what WHERE EXISTS (SELECT 1 FROM ledger.wallets
                                                     WHERE debt_milli > 0)
    UNION ALL SELECT 'per-lot draws' WHERE EXISTS (SELECT 1 FROM ledger.draws)
    UNION ALL SELECT 'clawed holds or lots' WHERE EXISTS (
      SELECT 1 FROM ledger.holds WHERE clawed_milli > 0)
      OR EXISTS (SELECT 1 FROM ledger.grants WHERE clawed_milli > 0)
    UNION ALL SELECT 'audit log rows' WHERE EXISTS (SELECT 1 FROM ledger.audit_log)
    UNION ALL SELECT 'app links' WHERE EXISTS (SELECT 1 FROM ledger.app_links)) s;
  IF v_what IS NOT NULL THEN
    RAISE EXCEPTION 'refusing to downgrade ledger 0004: it would lose %', v_what;
  END IF;
END $$;
"""

_LOT_COLUMNS = ("expired_milli", "clawed_milli", "settled_milli", "legacy_milli")


def upgrade() -> None:
    for column in _LOT_COLUMNS:
        op.add_column(
            "grants",
            sa.Column(column, sa.BigInteger(), server_default="0", nullable=False),
            schema="ledger",
        )
    op.add_column("holds", sa.Column("owner", sa.Text(), nullable=True), schema="ledger")
    op.add_column(
        "holds",
        sa.Column("clawed_milli", sa.BigInteger(), server_default="0", nullable=False),
        schema="ledger",
    )
    op.create_table(
        "draws",
        sa.Column("tx_id", sa.BigInteger(), nullable=False),
        sa.Column("grant_id", sa.BigInteger(), nullable=False),
        sa.Column("amount_milli", sa.BigInteger(), nullable=False),
        sa.Column("returned_milli", sa.BigInteger(), server_default="0", nullable=False),
        sa.CheckConstraint(
            "amount_milli > 0 AND returned_milli >= 0 AND returned_milli <= amount_milli",
            name=op.f("ck_draws_returned_in_range"),
        ),
        sa.ForeignKeyConstraint(
            ["grant_id"], ["ledger.grants.id"], name=op.f("fk_draws_grant_id_grants")
        ),
        sa.ForeignKeyConstraint(
            ["tx_id"], ["ledger.transactions.id"], name=op.f("fk_draws_tx_id_transactions")
        ),
        sa.PrimaryKeyConstraint("tx_id", "grant_id", name=op.f("pk_draws")),
        schema="ledger",
    )
    op.create_index("ix_draws_grant", "draws", ["grant_id"], unique=False, schema="ledger")
    op.create_index("ix_hold_allocations_grant", "hold_allocations", ["grant_id"], schema="ledger")
    op.create_table(
        "app_links",
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("app", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("user_id", "app", name=op.f("pk_app_links")),
        schema="ledger",
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("tx_id", sa.BigInteger(), nullable=True),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("op", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("amount_milli", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
        schema="ledger",
    )
    execute_script(BACKFILL)
    op.alter_column("holds", "owner", nullable=False, schema="ledger")
    op.drop_constraint("ck_holds_status_known", "holds", schema="ledger")
    op.create_check_constraint(
        op.f("ck_holds_status_known"),
        "holds",
        "status IN ('active', 'captured', 'released', 'expired', 'clawed')",
        schema="ledger",
    )
    op.drop_constraint("ck_holds_captured_in_range", "holds", schema="ledger")
    op.create_check_constraint(
        op.f("ck_holds_captured_in_range"),
        "holds",
        "captured_milli >= 0 AND clawed_milli >= 0"
        " AND captured_milli + clawed_milli <= amount_milli",
        schema="ledger",
    )
    # Signatures that change: the 0002 versions would linger beside the new ones.
    op.execute("DROP FUNCTION ledger.apply_batch(jsonb)")
    op.execute("DROP FUNCTION ledger._draw(text, bigint, uuid)")
    execute_script((SQL_DIR / "0004_money_rules.sql").read_text())


def downgrade() -> None:
    execute_script(GUARD)
    op.execute("DROP FUNCTION ledger.apply_batch(json)")
    op.execute("DROP FUNCTION ledger._draw(text, bigint, uuid, bigint)")
    op.execute("DROP FUNCTION ledger._give_back(text, bigint, bigint)")
    op.execute("DROP FUNCTION ledger._remember(text, text, text, jsonb)")
    # Each earlier migration's own copy, in order: 0003 states what it redefined of 0002.
    execute_script((SQL_DIR / "0002_ledger.sql").read_text())
    execute_script((SQL_DIR / "0003_billing.sql").read_text())
    op.drop_constraint("ck_holds_captured_in_range", "holds", schema="ledger")
    op.create_check_constraint(
        op.f("ck_holds_captured_in_range"),
        "holds",
        "captured_milli >= 0 AND captured_milli <= amount_milli",
        schema="ledger",
    )
    op.drop_constraint("ck_holds_status_known", "holds", schema="ledger")
    op.create_check_constraint(
        op.f("ck_holds_status_known"),
        "holds",
        "status IN ('active', 'captured', 'released', 'expired')",
        schema="ledger",
    )
    op.drop_table("audit_log", schema="ledger")
    op.drop_table("app_links", schema="ledger")
    op.drop_index("ix_hold_allocations_grant", table_name="hold_allocations", schema="ledger")
    op.drop_index("ix_draws_grant", table_name="draws", schema="ledger")
    op.drop_table("draws", schema="ledger")
    op.drop_column("holds", "clawed_milli", schema="ledger")
    op.drop_column("holds", "owner", schema="ledger")
    for column in _LOT_COLUMNS:
        op.drop_column("grants", column, schema="ledger")
