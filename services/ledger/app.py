"""The ledger service: balances, grants, debits, holds, refunds and the journal."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from fastapi import FastAPI

from services.kit.app import create_service_app
from services.kit.db import plain_url
from services.kit.front import FrontApp
from services.ledger.api import routers
from services.ledger.batcher import GroupCommitter
from services.ledger.config import get_settings
from services.ledger.models import SCHEMA
from services.ledger.repository import BalanceReader
from services.ledger.service import Ledger
from services.ledger.tasks import consume_user_created

DESCRIPTION = """
Ku's ledger: one balance of Ku coins per user, shared by every app.

Amounts are Ku as JSON numbers with at most 3 decimals. Every POST takes an
`Idempotency-Key` header (or a natural `reference`): a retry replays the first
result, the same key with a different request is 409.
"""


async def _keep_session(conn: asyncpg.Connection) -> None:
    return None


@asynccontextmanager
async def ledger_writer(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    pool = await asyncpg.create_pool(
        plain_url(settings.database_url),
        min_size=2,
        max_size=settings.write_pool_size,
        # Writers only run single autocommit statements: no session state to reset,
        # so skip the RESET ALL round trip on every release.
        reset=_keep_session,
    )
    app.state.write_pool = pool
    # Balance reads in flight share one statement (repository.BalanceReader), on
    # connections of their own that plan it once: its array parameters make Postgres
    # judge a generic plan dearer than planning each call afresh (~1.3 ms of planning a
    # read, against ~0.05 ms to run it), so it is forced.
    read_pool = await asyncpg.create_pool(
        plain_url(settings.database_url),
        min_size=1,
        max_size=BalanceReader.MAX_INFLIGHT,
        reset=_keep_session,
        server_settings={"plan_cache_mode": "force_generic_plan"},
    )
    app.state.balances = BalanceReader(read_pool)
    app.state.ledger = Ledger(
        GroupCommitter(
            pool, max_ops=settings.batch_max_ops, max_inflight=settings.batch_max_inflight
        )
    )
    try:
        yield
    finally:
        await read_pool.close()
        await pool.close()


def create_app() -> FastAPI:
    settings = get_settings()
    app = create_service_app(
        name="ledger",
        settings=settings,
        routers=routers,
        title="Ku Ledger",
        description=DESCRIPTION,
        outbox_schema=SCHEMA,
        hooks=[ledger_writer, consume_user_created],
        # The hot routes (debit, hold, grant, capture, release, balance) are answered
        # in front of FastAPI's layers (services/kit/front.py, docs/ledger.md).
        app_class=FrontApp,
    )
    return app
