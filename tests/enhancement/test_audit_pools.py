"""Audit: a platform pool raced by two processes (each its own engine and connection
pool, as the service and the worker are): the balance never goes below zero, every
call is paid once whichever process saw it, `consumed` is exact, and the crossing
below the threshold is alerted once. Postgres's row lock decides, not one process."""

from __future__ import annotations

import asyncio
import os
import sys

from sqlalchemy import text

from services.enhancement.repository import Repository
from services.enhancement.service import Enhancer
from tests.enhancement.test_pools import add_provider

CALLS = 40  # per process; the first half of the calls are seen by both processes
COST = 30_000
REFILL = 600_000  # 20 calls' worth: the pool runs dry halfway

RACER = """
import asyncio, sys, uuid
from services.enhancement.config import EnhancementSettings
from services.enhancement.repository import Repository
from tests.enhancement.conftest import in_process

async def main(url, provider, tag, calls, cost):
    async with in_process(EnhancementSettings(database_url=url)) as e:
        async def one(i):
            # Calls 0..calls/2-1 are the same calls in both processes (a retried job).
            who = "both" if i < calls // 2 else tag
            task = uuid.uuid5(uuid.NAMESPACE_URL, f"{provider}:{who}:{i}")
            async with e.uow() as session:
                await e.consume_pool(Repository(session), provider, cost, task, f"call-{i}")
        await asyncio.gather(*(one(i) for i in range(calls)))

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
"""


async def test_two_processes_drain_a_pool_exactly(enhancer: Enhancer, ku_database_url: str):
    provider = add_provider(enhancer, COST)
    await enhancer.refill(provider, REFILL, "initial")
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", RACER, ku_database_url, provider, tag, str(CALLS), str(COST),
            env=dict(os.environ),
        )
        for tag in ("a", "b")
    ]  # fmt: skip
    for proc in procs:
        assert await asyncio.wait_for(proc.wait(), 120) == 0
    distinct = CALLS // 2 + 2 * (CALLS - CALLS // 2)
    async with enhancer.uow() as session:
        repo = Repository(session)
        pool = await repo.pool(provider)
        entries = (
            await session.execute(
                text(
                    "SELECT count(*) AS n, sum(amount_milli) AS total FROM enhancement.pool_entries"
                    " WHERE provider = :p AND kind = 'consume'"
                ),
                {"p": provider},
            )
        ).one()
        alerts = [a for a in await repo.alerts(500, "pool_low") if a["subject"] == provider]
    assert pool is not None
    assert entries.n == distinct and entries.total == distinct * COST
    assert pool["consumed_milli"] == distinct * COST
    assert pool["balance_milli"] == max(0, REFILL - distinct * COST) == 0
    assert len(alerts) == 1, alerts
