"""allowances in the ledger: the month's included enhancements are a ledger allowance
(ledger migration 0008, `ledger.allowances`), drawn per task; the counter goes

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


def upgrade() -> None:
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
