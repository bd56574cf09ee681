"""Billing jobs. Each is safe to run at any time, twice, or concurrently.

The worker runs `reconcile` as the cron job `billing.reconcile`, every
KU_BILLING_RECONCILE_SECONDS (600; see `services.worker.ledger_cron_jobs`, which keeps
this package free of arq). `await reconcile()` needs nothing else: it opens its own
engine and ledger write pool from the ledger's settings and closes them. Inside a
process that already has them (the ledger app), pass `sessionmaker=` and `ledger=`.
Returns counts.
Also on the command line: `ku billing reconcile [--hours N]`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.kit.db import create_engine, plain_url, sessionmaker_for, unit_of_work
from services.ledger.batcher import GroupCommitter
from services.ledger.billing.razorpay_api import RazorpayAPI
from services.ledger.billing.repository import BillingRepository
from services.ledger.billing.service import PENDING_PAYMENT, Billing
from services.ledger.config import LedgerSettings, get_settings
from services.ledger.service import Ledger

log = logging.getLogger("ku.ledger.billing.tasks")

PENDING_BATCH = 100


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
    that is ours and not granted yet, and apply refunds no webhook reported; then retry
    the refund events that arrived before their payment. Granted payments and applied
    refunds are left alone (the ledger replays their keys), so running this any time is
    harmless."""
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
    await _retry_pending_refunds(sessionmaker, ledger, settings, counts)
    log.info("reconcile: %s", dict(counts))
    return dict(counts)


async def _retry_pending_refunds(
    sessionmaker: async_sessionmaker[AsyncSession],
    ledger: Ledger,
    settings: LedgerSettings,
    counts: Counter[str],
) -> None:
    """Refund events parked as `pending_payment`: ask Razorpay for the payment as it is
    now, and settle it with its refunds once it is ours. Each event in its own unit of
    work, locked (SKIP LOCKED: a redelivery or another worker holding it wins)."""
    async with unit_of_work(sessionmaker) as session:
        waiting = await BillingRepository(session).pending_events(
            PENDING_PAYMENT, limit=PENDING_BATCH
        )
    api = RazorpayAPI(settings)
    for event in waiting:
        payment_id = event["razorpay_payment_id"]
        try:
            # Fetched before the unit of work: no outside call while a connection is held.
            entity = await api.fetch_payment(payment_id) if payment_id else None
            async with unit_of_work(sessionmaker) as session:
                billing = Billing(session, ledger, settings)
                if not await billing.repo.lock_event(event["event_id"], PENDING_PAYMENT):
                    continue  # resolved meanwhile (a redelivery, another worker)
                outcome = (
                    await billing.retry_pending_refund(event, entity)
                    if entity is not None
                    else PENDING_PAYMENT
                )
            counts[f"pending_refund_{outcome}"] += 1
        except Exception:
            log.exception("reconcile: pending refund event %s failed", event["event_id"])
            counts["errors"] += 1
