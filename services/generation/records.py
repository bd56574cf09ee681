"""A generation's row: inserted once its first words are out, updated at settlement.

Two statements per generation, each one autocommitted statement on an asyncpg pool of
the records' own (`KU_GENERATION_RECORDS_POOL_SIZE` connections, opened as needed and
kept): one round trip, where a SQLAlchemy unit of work costs BEGIN, the statement and
COMMIT, plus its compile and session machinery (measured under bench/generation.py at
~9 % of the generation process's CPU). Not the service's SQLAlchemy pool: 64 streams
starting together overflowed it, and every overflow connection was opened (TLS
negotiation, authentication) and closed again per wave, ~11 % of the process's CPU in
py-spy at stop 11.

Writing a row is best effort: a failure is logged and the generation goes on (the
money is on the ledger: the hold, then its capture or release).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import asyncpg

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


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Single autocommitted statements leave no session state: no RESET ALL on release."""
    return None


class Records:
    def __init__(self, dsn: str, *, pool_size: int) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self.dsn, min_size=1, max_size=self.pool_size, reset=_keep_session
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def _execute(self, sql: str, *args: Any) -> None:
        assert self._pool is not None, "Records.open() first"
        await self._pool.execute(sql, *args)

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
