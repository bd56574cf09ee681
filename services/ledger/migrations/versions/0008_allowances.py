"""allowances: monthly allowances of units (e.g. included enhancements), not Ku

Three tables, no function (the operations are services/ledger/allowances.py, each in
its own transaction outside the group committer; `apply_batch` and the money functions
are untouched):

- `allowances(user_id, kind, period)`: granted and used units of one month, and when
  the month ends (`expires_at`, the first instant of the next month UTC);
- `allowance_draws(reference)`: one unit drawn for a reference, at most once; active
  until confirmed or returned, or expired past its TTL;
- `allowance_entries`: every grant increase, draw, confirmation, return and expiry,
  append-only (the journal's trigger, `ledger._append_only`).

Downgrading refuses while any allowance entry exists (it would lose their record).

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamps() -> list[sa.Column[object]]:
    return [
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        )
    ]


def upgrade() -> None:
    op.create_table(
        "allowances",
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("period", sa.Text(), nullable=False),
        sa.Column("granted", sa.Integer(), server_default="0", nullable=False),
        sa.Column("used", sa.Integer(), server_default="0", nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        *_timestamps(),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("granted >= 0", name=op.f("ck_allowances_granted_not_negative")),
        sa.CheckConstraint(
            "used >= 0 AND used <= granted", name=op.f("ck_allowances_used_in_range")
        ),
        sa.PrimaryKeyConstraint("user_id", "kind", "period", name=op.f("pk_allowances")),
        schema="ledger",
    )
    op.create_table(
        "allowance_draws",
        sa.Column("reference", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("period", sa.Text(), nullable=False),
        sa.Column("owner", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), server_default="active", nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        *_timestamps(),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('active', 'confirmed', 'returned', 'expired')",
            name=op.f("ck_allowance_draws_status_known"),
        ),
        sa.PrimaryKeyConstraint("reference", name=op.f("pk_allowance_draws")),
        schema="ledger",
    )
    op.create_index(
        "ix_allowance_draws_expiring",
        "allowance_draws",
        ["expires_at"],
        schema="ledger",
        postgresql_where=sa.text("status = 'active'"),
    )
    op.create_index(
        "ix_allowance_draws_allowance",
        "allowance_draws",
        ["user_id", "kind", "period"],
        schema="ledger",
    )
    op.create_table(
        "allowance_entries",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("period", sa.Text(), nullable=False),
        sa.Column("entry", sa.Text(), nullable=False),
        sa.Column("granted_delta", sa.Integer(), server_default="0", nullable=False),
        sa.Column("used_delta", sa.Integer(), server_default="0", nullable=False),
        sa.Column("reference", sa.Text(), nullable=True),
        sa.Column("actor", sa.Text(), nullable=True),
        *_timestamps(),
        sa.CheckConstraint(
            "entry IN ('grant', 'draw', 'confirm', 'return', 'expiry')",
            name=op.f("ck_allowance_entries_entry_known"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_allowance_entries")),
        schema="ledger",
    )
    op.create_index(
        "ix_allowance_entries_allowance",
        "allowance_entries",
        ["user_id", "kind", "period"],
        schema="ledger",
    )
    op.create_index(
        "ix_allowance_entries_reference",
        "allowance_entries",
        ["reference"],
        schema="ledger",
        postgresql_where=sa.text("reference IS NOT NULL"),
    )
    # Append-only, as the journal (the trigger function is 0002's).
    op.execute(
        "CREATE TRIGGER allowance_entries_append_only BEFORE UPDATE OR DELETE"
        " ON ledger.allowance_entries FOR EACH ROW EXECUTE FUNCTION ledger._append_only()"
    )


def downgrade() -> None:
    op.execute(
        """
        DO $$
        BEGIN
          IF EXISTS (SELECT 1 FROM ledger.allowance_entries) THEN
            RAISE EXCEPTION 'downgrade of 0008 refused: allowance entries exist (their'
              ' record would be lost)';
          END IF;
        END $$
        """
    )
    op.drop_table("allowance_entries", schema="ledger")
    op.drop_table("allowance_draws", schema="ledger")
    op.drop_table("allowances", schema="ledger")
