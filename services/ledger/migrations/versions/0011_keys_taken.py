"""keys taken: an idempotency key stored meanwhile by another transaction is refused;
functions in sql/0011_keys_taken.sql

- `_apply` and `_apply_batch_grouped` (0009's and 0010's bodies otherwise) check what
  their `INSERT ... ON CONFLICT DO NOTHING` of the operation's keys stored: a key
  another transaction stored meanwhile with other parameters (one key sent at once for
  two users: two wallet locks, so neither lookup saw the other) raises
  `unique_violation` through the new `_keys_taken`; the committer then runs each
  operation again alone and that one is 409 `idempotency_key_reused`, where both
  applied before.

No table changes.

Revision ID: 0011
Revises: 0010
"""

import re
from collections.abc import Sequence
from pathlib import Path

from alembic import op

from services.kit.migrations import execute_script

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
SQL_FILE = "0011_keys_taken.sql"

_FUNCTION = re.compile(r"CREATE OR REPLACE FUNCTION ledger\.(\w+)\s*\(.*?\$\$;", re.DOTALL)


def upgrade() -> None:
    execute_script((SQL_DIR / SQL_FILE).read_text())


def downgrade() -> None:
    # What 0011 redefines, as the newest earlier file states it; what it adds goes.
    earlier: dict[str, str] = {}
    for path in sorted(SQL_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        if path.name[:4] < "0011":
            for match in _FUNCTION.finditer(path.read_text()):
                earlier[match.group(1)] = match.group(0)
    for name in _FUNCTION.findall((SQL_DIR / SQL_FILE).read_text()):
        if name in earlier:
            execute_script(earlier[name])
    op.execute("DROP FUNCTION ledger._keys_taken(text[], text[], text[])")
