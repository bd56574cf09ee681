"""Ledger jobs and event consumers. Each is safe to run twice, or concurrently."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from fastapi import FastAPI

from services.kit.bus import Consumer
from services.kit.outbox import stream_name
from services.ledger.config import get_settings
from services.ledger.service import Ledger

log = logging.getLogger("ku.ledger.tasks")

JOB_BATCH = 500


async def _drain(pool: asyncpg.Pool, function: str) -> int:
    """Call a job function in batches of JOB_BATCH until a call finds nothing to do."""
    total = 0
    while True:
        async with pool.acquire() as conn, conn.transaction():
            done = await conn.fetchval(f"SELECT ledger.{function}($1)", JOB_BATCH)
        if not done:
            return total
        total += done


async def expire_holds(pool: asyncpg.Pool) -> int:
    """Release every hold whose TTL has passed. Returns the number of users swept."""
    return await _drain(pool, "expire_holds")


async def expire_grants(pool: asyncpg.Pool) -> int:
    """Move expired credit out of wallets into the `expired` account."""
    return await _drain(pool, "expire_grants")


def user_created_handler(ledger: Ledger, welcome_milli: int) -> Any:
    async def handle(event: dict[str, Any]) -> None:
        user_id = event["payload"]["user_id"]
        # The welcome grant is keyed by user id: any number of deliveries, one grant.
        await ledger.open_account(str(user_id), welcome_milli)

    return handle


@asynccontextmanager
async def consume_user_created(app: FastAPI) -> AsyncIterator[None]:
    """Lifespan hook: open an account with welcome credits for every `user.created`."""
    settings = get_settings()
    consumer = Consumer(
        app.state.redis,
        [stream_name(settings.bus_prefix, "auth")],
        group="ledger",
        handler=user_created_handler(app.state.ledger, settings.welcome_credits_milli),
        topics={"user.created"},
    )
    consumer.start()
    app.state.user_created_consumer = consumer
    try:
        yield
    finally:
        await consumer.stop()
