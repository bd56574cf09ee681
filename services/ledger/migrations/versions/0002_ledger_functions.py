"""ledger functions: operations, group-commit batch, expiry jobs, append-only journal

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence
from pathlib import Path

from alembic import op

from services.kit.migrations import execute_script

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQL = Path(__file__).resolve().parents[2] / "sql" / "0002_ledger.sql"


def upgrade() -> None:
    execute_script(SQL.read_text())


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS ledger.apply_batch(jsonb), ledger.apply(jsonb) CASCADE")
