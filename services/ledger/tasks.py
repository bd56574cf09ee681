"""Ledger jobs and event consumers. Each is safe to run twice, or concurrently."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from fastapi import FastAPI

from services.kit.bus import Consumer
from services.kit.db import unit_of_work
from services.kit.outbox import stream_name
from services.ledger import allowances
from services.ledger.config import get_settings
from services.ledger.repository import LedgerRepository
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
    """Release every hold whose TTL has passed, and expire every allowance draw whose
    TTL has passed (its unit comes back while its period lasts). Returns the number of
    users swept plus the number of draws expired."""
    swept = await _drain(pool, "expire_holds")
    return swept + await allowances.expire_draws(pool)


async def expire_grants(pool: asyncpg.Pool) -> int:
    """Move expired credit out of wallets into the `expired` account."""
    return await _drain(pool, "expire_grants")


def auth_events_handler(ledger: Ledger, sessionmaker: Any, welcome_milli: int) -> Any:
    async def handle(event: dict[str, Any]) -> None:
        payload = event["payload"]
        user_id = str(payload["user_id"])
        if event["topic"] == "user.linked":
            async with unit_of_work(sessionmaker) as session:
                await LedgerRepository(session).link(user_id, str(payload["app"]))
            return
        # The first grant is keyed by user id: any number of deliveries, one grant. An
        # admin's create-user carries its initial credits here, so the welcome grant and
        # the initial credits are one operation, never both.
        initial = payload.get("initial_credits_milli")
        if isinstance(initial, int) and initial > 0:
            audit = {
                "actor": str(payload.get("created_by") or "auth"),
                "reason": str(payload.get("reason") or "initial credits"),
            }
            await ledger.open_account(user_id, initial, audit=audit)
        else:
            await ledger.open_account(user_id, welcome_milli)

    return handle


@asynccontextmanager
async def consume_user_created(app: FastAPI) -> AsyncIterator[None]:
    """Lifespan hook: for every `user.created`, open an account with its first grant;
    for every `user.linked`, record the user's link to that partner app."""
    settings = get_settings()
    consumer = Consumer(
        app.state.redis,
        [stream_name(settings.bus_prefix, "auth")],
        group="ledger",
        handler=auth_events_handler(
            app.state.ledger, app.state.sessionmaker, settings.welcome_credits_milli
        ),
        topics={"user.created", "user.linked"},
    )
    consumer.start()
    app.state.user_created_consumer = consumer
    try:
        yield
    finally:
        await consumer.stop()
