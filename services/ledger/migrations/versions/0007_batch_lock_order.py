"""batch lock order: `ledger.apply_batch` locks the wallets of every user a batch names,
in one order, before applying it (batches cannot deadlock with each other);
functions in sql/0007_batch_lock_order.sql

No table changes, no signature changes.

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence
from pathlib import Path

from services.kit.migrations import execute_script

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"


def upgrade() -> None:
    execute_script((SQL_DIR / "0007_batch_lock_order.sql").read_text())


def downgrade() -> None:
    # 0006's file states in full every function 0007 redefines.
    execute_script((SQL_DIR / "0006_debit_path.sql").read_text())
