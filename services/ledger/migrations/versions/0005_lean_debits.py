"""lean debits: the same money rules, fewer rows, index entries and checks per debit;
functions in sql/0005_lean_debits.sql

What one debit wrote under 0004, besides its rows: 16 index entries (3 per posting,
3 for its lot's UPDATE, 2 for its draw, ...), and 4 foreign-key checks (a per-row
trigger each). Cut here, each unread by any rule or query:

- `grants`: the lot indexes filter on the generated column `spendable` instead of
  `remaining_milli > 0`, so a draw is a HOT update (no index entry), with free space
  left in the table's pages for those updates (fillfactor 80).
- `postings`: the primary key becomes (tx_id, id), which serves every lookup by
  transaction, so `ix_postings_tx` goes; `ix_postings_account_owner` goes (no query
  reads postings by account and owner through it: the verify checks and the admin
  reports aggregate whole accounts).
- `draws`: `ix_draws_grant` goes (draws are read by charge, the primary key; the
  per-lot verify check aggregates the whole table).
- Foreign keys from `postings` and `draws` to `transactions` and `grants`: those rows
  are written only by the ledger's functions, in the transaction that writes or locks
  their parent, and transactions are append-only. `ku ledger verify` checks the links
  instead (`records_linked`).

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

from services.kit.migrations import execute_script

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"

_FOREIGN_KEYS = (
    ("fk_postings_tx_id_transactions", "postings", "transactions", "tx_id"),
    ("fk_draws_tx_id_transactions", "draws", "transactions", "tx_id"),
    ("fk_draws_grant_id_grants", "draws", "grants", "grant_id"),
)


def upgrade() -> None:
    # Free space for HOT updates in every page written from now on (and by the rewrite
    # that adding a stored generated column makes).
    op.execute("ALTER TABLE ledger.grants SET (fillfactor = 80)")
    op.add_column(
        "grants",
        sa.Column(
            "spendable",
            sa.Boolean(),
            sa.Computed("remaining_milli > 0", persisted=True),
            nullable=False,
        ),
        schema="ledger",
    )
    op.drop_index("ix_grants_spendable", table_name="grants", schema="ledger")
    op.drop_index("ix_grants_expiring", table_name="grants", schema="ledger")
    op.create_index(
        "ix_grants_spendable",
        "grants",
        ["user_id", "expires_at"],
        schema="ledger",
        postgresql_where=sa.text("spendable"),
    )
    op.create_index(
        "ix_grants_expiring",
        "grants",
        ["expires_at"],
        schema="ledger",
        postgresql_where=sa.text("spendable"),
    )
    for name, table, _, _ in _FOREIGN_KEYS:
        op.drop_constraint(name, table, schema="ledger", type_="foreignkey")
    op.drop_constraint("pk_postings", "postings", schema="ledger", type_="primary")
    op.create_primary_key("pk_postings", "postings", ["tx_id", "id"], schema="ledger")
    op.drop_index("ix_postings_tx", table_name="postings", schema="ledger")
    op.drop_index("ix_postings_account_owner", table_name="postings", schema="ledger")
    op.drop_index("ix_draws_grant", table_name="draws", schema="ledger")
    # A signature that changes: the 0004 version would linger beside the new one.
    op.execute("DROP FUNCTION ledger._changed(text, bigint, text, text, bigint, bigint)")
    execute_script((SQL_DIR / "0005_lean_debits.sql").read_text())


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION ledger._changed(text, bigint, text, text, bigint, bigint, bigint, bigint)"
    )
    # 0004's file states in full every function 0005 redefines.
    execute_script((SQL_DIR / "0004_money_rules.sql").read_text())
    op.create_index("ix_draws_grant", "draws", ["grant_id"], schema="ledger")
    op.create_index("ix_postings_account_owner", "postings", ["account", "owner"], schema="ledger")
    op.create_index("ix_postings_tx", "postings", ["tx_id"], schema="ledger")
    op.drop_constraint("pk_postings", "postings", schema="ledger", type_="primary")
    op.create_primary_key("pk_postings", "postings", ["id"], schema="ledger")
    for name, table, parent, column in _FOREIGN_KEYS:
        op.create_foreign_key(
            name, table, parent, [column], ["id"], source_schema="ledger", referent_schema="ledger"
        )
    op.drop_index("ix_grants_expiring", table_name="grants", schema="ledger")
    op.drop_index("ix_grants_spendable", table_name="grants", schema="ledger")
    op.drop_column("grants", "spendable", schema="ledger")
    op.create_index(
        "ix_grants_spendable",
        "grants",
        ["user_id", "expires_at"],
        schema="ledger",
        postgresql_where=sa.text("remaining_milli > 0"),
    )
    op.create_index(
        "ix_grants_expiring",
        "grants",
        ["expires_at"],
        schema="ledger",
        postgresql_where=sa.text("remaining_milli > 0"),
    )
    op.execute("ALTER TABLE ledger.grants RESET (fillfactor)")
