"""hold path: a hold, a capture and a release in fewer statements, calls and checks;
functions in sql/0009_hold_path.sql

- `_op_resolve` (capture, release) states an active hold's resolution inline and
  returns its `credits.changed` event with its result (one outbox row per batch, as a
  debit's and a hold's since 0006); it takes the wallet's debt as a third argument.
- `_apply` looks for an expired hold of the user in one index probe before calling
  `_sweep_holds`: `ix_holds_user_active` becomes (user_id, expires_at).
- `apply_batch` reads the batch's users once and takes 0007's advance locks by key,
  in the subtransaction that applies the operations.
- The foreign keys of `holds` (to `wallets`) and `hold_allocations` (to `holds` and
  `grants`) go, as those of `postings` and `draws` went in 0005: a hold and its
  allocations are written only by the ledger's functions, under the lock of the wallet
  they name, next to the lots they read; wallets, holds and lots are never deleted.
  Three per-row trigger checks per hold. `ku ledger verify` checks the links instead
  (`records_linked`).

Revision ID: 0009
Revises: 0008
"""

import re
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

from services.kit.migrations import execute_script

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
SQL_FILE = "0009_hold_path.sql"

_FOREIGN_KEYS = (
    ("fk_holds_user_id_wallets", "holds", "wallets", "user_id", "user_id"),
    ("fk_hold_allocations_hold_id_holds", "hold_allocations", "holds", "hold_id", "id"),
    ("fk_hold_allocations_grant_id_grants", "hold_allocations", "grants", "grant_id", "id"),
)

_FUNCTION = re.compile(r"CREATE OR REPLACE FUNCTION ledger\.(\w+)\s*\(.*?\$\$;", re.DOTALL)


def _user_active_index(columns: list[str]) -> None:
    op.drop_index("ix_holds_user_active", table_name="holds", schema="ledger")
    op.create_index(
        "ix_holds_user_active",
        "holds",
        columns,
        schema="ledger",
        postgresql_where=sa.text("status = 'active'"),
    )


def upgrade() -> None:
    for name, table, _, _, _ in _FOREIGN_KEYS:
        op.drop_constraint(name, table, schema="ledger", type_="foreignkey")
    _user_active_index(["user_id", "expires_at"])
    # A signature that changes: the 0004 version would linger beside the new one.
    op.execute("DROP FUNCTION ledger._op_resolve(jsonb, text)")
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
    op.execute("DROP FUNCTION ledger._op_resolve(jsonb, text, bigint)")
    # What 0009 redefines, as the newest earlier file states it (`_op_resolve` from
    # 0004, `_apply` from 0006, `apply_batch` from 0007).
    earlier = _definitions_before("0009")
    for name in _FUNCTION.findall((SQL_DIR / SQL_FILE).read_text()):
        execute_script(earlier[name])
    _user_active_index(["user_id"])
    for name, table, parent, column, key in _FOREIGN_KEYS:
        op.create_foreign_key(
            name, table, parent, [column], [key], source_schema="ledger", referent_schema="ledger"
        )
