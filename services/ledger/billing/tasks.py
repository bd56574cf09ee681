"""Billing jobs. Each is safe to run at any time, twice, or concurrently.

For the worker (cron), like `CRON_JOBS`:

    CRON_JOBS = [
        # every 10 minutes: grant captured payments that no webhook or checkout reported
        {"name": "billing.reconcile",
         "function": "services.ledger.billing.tasks:reconcile",
         "kwargs": {"lookback_hours": None},   # None: KU_BILLING_RECONCILE_HOURS (72)
         "cron": {"minute": {0, 10, 20, 30, 40, 50}}},
    ]

`await reconcile()` needs nothing else: it opens its own engine and ledger write
pool from the ledger's settings and closes them. Inside a process that already
has them (the ledger app), pass `sessionmaker=` and `ledger=`. Returns counts.
Also on the command line: `ku billing reconcile [--hours N]`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.kit.db import create_engine, plain_url, sessionmaker_for, unit_of_work
from services.ledger.batcher import GroupCommitter
from services.ledger.billing.razorpay_api import RazorpayAPI
from services.ledger.billing.service import Billing
from services.ledger.config import LedgerSettings, get_settings
from services.ledger.service import Ledger

log = logging.getLogger("ku.ledger.billing.tasks")

CRON_JOBS: list[dict[str, Any]] = [
    {
        "name": "billing.reconcile",
        "function": "services.ledger.billing.tasks:reconcile",
        "kwargs": {"lookback_hours": None},
        "cron": {"minute": {0, 10, 20, 30, 40, 50}},
    }
]


@asynccontextmanager
async def _resources(
    settings: LedgerSettings,
) -> AsyncIterator[tuple[async_sessionmaker[AsyncSession], Ledger]]:
    engine = create_engine(settings, pool_size=2)
    pool = await asyncpg.create_pool(plain_url(settings.database_url), min_size=1, max_size=2)
    try:
        yield sessionmaker_for(engine), Ledger(GroupCommitter(pool, max_ops=16, max_inflight=1))
    finally:
        await pool.close()
        await engine.dispose()


async def reconcile(
    *,
    lookback_hours: int | None = None,
    sessionmaker: async_sessionmaker[AsyncSession] | None = None,
    ledger: Ledger | None = None,
    settings: LedgerSettings | None = None,
) -> dict[str, int]:
    """Fetch the last `lookback_hours` of payments from Razorpay, grant every captured one
    that is ours and not granted yet, and apply refunds no webhook reported. Granted
    payments and applied refunds are left alone (the ledger replays their keys), so
    running this any time is harmless."""
    settings = settings or get_settings()
    if sessionmaker is None or ledger is None:
        async with _resources(settings) as (own_sessionmaker, own_ledger):
            return await reconcile(
                lookback_hours=lookback_hours,
                sessionmaker=own_sessionmaker,
                ledger=own_ledger,
                settings=settings,
            )
    hours = lookback_hours or settings.billing_reconcile_hours
    now = int(time.time())
    payments = await RazorpayAPI(settings).payments_between(now - hours * 3600, now + 60)
    counts: Counter[str] = Counter(fetched=len(payments))
    for entity in payments:
        try:
            async with unit_of_work(sessionmaker) as session:
                billing = Billing(session, ledger, settings)
                settled = await billing.settle_payment(entity, fetch_invoices=True)
                refunds = await billing.replay_refunds(entity)
            counts[settled.outcome] += 1
            for refund in refunds:
                counts[f"refund_{refund.outcome}"] += 1
            if settled.outcome == "granted":
                log.warning("reconcile granted missed payment %s", entity.get("id"))
        except Exception:
            # One bad payment must not stop the others; the next run retries it.
            log.exception("reconcile: payment %s failed", entity.get("id"))
            counts["errors"] += 1
    log.info("reconcile: %s", dict(counts))
    return dict(counts)
