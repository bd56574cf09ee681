"""debit path: a debit in fewer statements and PL/pgSQL calls, one outbox row per batch;
functions in sql/0006_debit_path.sql

No table changes. `_op_debit` and `_op_reserve` take the wallet's debt (read by `apply` with the wallet
lock) as a third argument; `ledger._apply` is new (the operation, its event returned
rather than written); `ledger.apply` and `ledger.apply_batch` write the events.

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence
from pathlib import Path

from alembic import op

from services.kit.migrations import execute_script

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"


def upgrade() -> None:
    # A signature that changes: the 0005 version would linger beside the new one.
    op.execute("DROP FUNCTION ledger._op_debit(jsonb, text)")
    op.execute("DROP FUNCTION ledger._op_reserve(jsonb, text)")
    execute_script((SQL_DIR / "0006_debit_path.sql").read_text())


def downgrade() -> None:
    # Events still in the outbox as one row per batch (a JSON array) stay relayable:
    # the relay expands any row whose payload is an array, whatever wrote it.
    op.execute("DROP FUNCTION ledger._op_debit(jsonb, text, bigint)")
    op.execute("DROP FUNCTION ledger._op_reserve(jsonb, text, bigint)")
    op.execute("DROP FUNCTION ledger._apply(jsonb)")
    # 0005's file states in full every function 0006 redefines.
    execute_script((SQL_DIR / "0005_lean_debits.sql").read_text())
