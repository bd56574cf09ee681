"""A generation's row: inserted once its first words are out, updated at settlement.

Two statements per generation, on asyncpg directly (a small pool of its own): each is
one autocommitted statement, so one round trip, where a SQLAlchemy unit of work costs
BEGIN, the statement and COMMIT, plus its compile and session machinery (measured
under bench/generation.py at ~9 % of the generation process's CPU). Nothing else
happens in these connections, so the pool skips asyncpg's reset query on release.

Writing a row is best effort: a failure is logged and the generation goes on (the
money is on the ledger: the hold, then its capture or release).
"""

from __future__ import annotations

import asyncio
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


async def _no_reset(_: asyncpg.Connection) -> None:
    return None


class Records:
    def __init__(self, dsn: str, *, max_connections: int = 4) -> None:
        self.dsn = dsn
        self.max_connections = max_connections
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    async def _get(self) -> asyncpg.Pool:
        # Opened on first use: the service starts (and answers /health) without it.
        if self._pool is None:
            async with self._opening:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self.dsn, min_size=1, max_size=self.max_connections, reset=_no_reset
                    )
        return self._pool

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def start(self, record: dict[str, Any]) -> None:
        try:
            pool = await self._get()
            await pool.execute(
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
            pool = await self._get()
            await pool.execute(
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
