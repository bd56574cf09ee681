"""provider unhealthy flag: one alert per breaker opening

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 07:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "pools",
        sa.Column("unhealthy_alerted", sa.Boolean(), server_default="f", nullable=False),
        schema="enhancement",
    )


def downgrade() -> None:
    op.drop_column("pools", "unhealthy_alerted", schema="enhancement")
