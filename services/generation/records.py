"""A generation's row: inserted once its first words are out, updated at settlement.

Two statements per generation, each sent on the asyncpg connection under the
service's SQLAlchemy pool (no connections of its own): one autocommitted statement,
so one round trip, where a SQLAlchemy unit of work costs BEGIN, the statement and
COMMIT, plus its compile and session machinery (measured under bench/generation.py at
~9 % of the generation process's CPU).

Writing a row is best effort: a failure is logged and the generation goes on (the
money is on the ledger: the hold, then its capture or release).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from services.generation.models import SCHEMA

log = logging.getLogger("ku.generation")

_INSERT = (
    f"INSERT INTO {SCHEMA}.generations "
    "(id, user_id, app, kind, model, prompt, max_words, held_milli, hold_id, status) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'running')"
)
_FINISH = (
    f"UPDATE {SCHEMA}.generations SET status = $2, served_model = $3, provider = $4, "
    "offline = $5, output = $6, words = $7, cost_milli = $8, latency_ms = $9, error = $10, "
    "finished_at = now() WHERE id = $1"
)


class Records:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def _execute(self, sql: str, *args: Any) -> None:
        async with self.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            # No transaction was begun through SQLAlchemy: the statement commits alone,
            # and the connection goes back to the pool without a rollback round trip.
            await raw.driver_connection.execute(sql, *args)  # type: ignore[union-attr]

    async def start(self, record: dict[str, Any]) -> None:
        try:
            await self._execute(
                _INSERT,
                record["id"],
                record["user_id"],
                record["app"],
                record["kind"],
                record["model"],
                record["prompt"],
                record["max_words"],
                record["held_milli"],
                record["hold_id"],
            )
        except Exception:
            log.exception("generation %s: could not record its start", record["id"])

    async def finish(self, generation_id: str, values: dict[str, Any]) -> None:
        try:
            await self._execute(
                _FINISH,
                uuid.UUID(generation_id),
                values["status"],
                values["served_model"],
                values["provider"],
                values["offline"],
                values["output"],
                values["words"],
                values["cost_milli"],
                values["latency_ms"],
                values["error"],
            )
        except Exception:
            log.exception("generation %s: could not record its outcome", generation_id)
