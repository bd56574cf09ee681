"""grouped debits: a batch's plain debits decided together and written once; function
in sql/0010_grouped_debits.sql

- `apply_batch` hands a batch of three operations or more to `_apply_batch_grouped`,
  which decides a run of three or more consecutive plain debits from one read of its users'
  wallets (locked in user order), their spendable lots and the run's idempotency keys,
  in the batch's order and by the rules `_apply` and `_op_debit` apply one at a time;
  then writes the run's journal rows, postings, draws and keys as one INSERT each and
  each lot and wallet it touched in one UPDATE. Every other operation goes through
  `_apply` as before, with what the run decided written first.

No table changes.

Revision ID: 0010
Revises: 0009
"""

import re
from collections.abc import Sequence
from pathlib import Path

from alembic import op

from services.kit.migrations import execute_script

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
SQL_FILE = "0010_grouped_debits.sql"

_FUNCTION = re.compile(r"CREATE OR REPLACE FUNCTION ledger\.(\w+)\s*\(.*?\$\$;", re.DOTALL)


def upgrade() -> None:
    execute_script((SQL_DIR / SQL_FILE).read_text())


def _definitions_before(number: str) -> dict[str, str]:
    """Each function's newest CREATE statement in the files older than `number`."""
    statements: dict[str, str] = {}
    for path in sorted(SQL_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        if path.name[:4] < number:
            for match in _FUNCTION.finditer(path.read_text()):
                statements[match.group(1)] = match.group(0)
    return statements


def downgrade() -> None:
    # What 0010 redefines (`apply_batch`), as the newest earlier file states it (0009);
    # what it adds goes.
    earlier = _definitions_before("0010")
    for name in _FUNCTION.findall((SQL_DIR / SQL_FILE).read_text()):
        if name in earlier:
            execute_script(earlier[name])
        else:
            op.execute(f"DROP FUNCTION ledger.{name}(json)")
