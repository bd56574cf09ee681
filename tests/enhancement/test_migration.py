"""Migration 0004: the current month's allowance counters move into the ledger, so
nobody's month starts over at the upgrade, and the ledger's invariants hold after it."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from alembic import command

from services.enhancement.service import next_period_start, period_of
from services.kit.db import plain_url
from services.kit.migrations import alembic_config
from services.kit.testing.plugin import drop_database, migrated_database
from services.ledger.verify import run_checks


@pytest.fixture
def at_0003() -> Iterator[str]:
    """A database of its own: every service at head, the enhancement's at 0003 (the
    counter table back, empty)."""
    name = f"ku_enh_mig_{secrets.token_hex(4)}"
    url = migrated_database(name)
    command.downgrade(alembic_config("enhancement", url), "0003")
    yield url
    asyncio.run(drop_database(name))


def _run(url: str, work: object) -> object:
    async def go() -> object:
        conn = await asyncpg.connect(plain_url(url))
        try:
            return await work(conn)  # type: ignore[operator]
        finally:
            await conn.close()

    return asyncio.run(go())


async def _task(conn: asyncpg.Connection, user: str, period: str, settled: bool) -> uuid.UUID:
    task_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO enhancement.tasks (id, user_id, app, enhancement_type, strength,"
        " input_source, input_key, input_content_type, input_width, input_height,"
        " price_milli, deadline_at, allowance_period, settled_at)"
        " VALUES ($1, $2, 'imagegene', 'lighting', 0.5, 'upload', 'k', 'image/png', 1, 1,"
        " 0, $3, $4, $5)",
        task_id,
        user,
        datetime.now(UTC) + timedelta(minutes=10),
        period,
        datetime.now(UTC) if settled else None,
    )
    return task_id


def test_the_months_counters_are_carried_into_the_ledger(at_0003: str) -> None:
    now = datetime.now(UTC)
    this, last = period_of(now), period_of(now.replace(day=1) - timedelta(days=1))
    plus, pro, old = "u-plus", "u-pro", "u-old"

    async def before(conn: asyncpg.Connection) -> uuid.UUID:
        await conn.execute(
            "INSERT INTO enhancement.allowances (user_id, period, included, used) VALUES"
            " ($1, $4, 10, 4), ($2, $4, 25, 0), ($3, $5, 10, 7)",
            plus,
            pro,
            old,
            this,
            last,
        )
        for _ in range(3):
            await _task(conn, plus, this, settled=True)
        return await _task(conn, plus, this, settled=False)  # still running

    running = _run(at_0003, before)
    command.upgrade(alembic_config("enhancement", at_0003), "head")

    async def after(conn: asyncpg.Connection) -> dict[str, object]:
        rows = await conn.fetch(
            "SELECT user_id, period, granted, used, expires_at FROM ledger.allowances"
        )
        draws = await conn.fetch(
            "SELECT reference, status FROM ledger.allowance_draws WHERE user_id = $1"
            " ORDER BY reference",
            plus,
        )
        counter = await conn.fetchval("SELECT to_regclass('enhancement.allowances')")
        return {
            "allowances": {
                (r["user_id"], r["period"]): (r["granted"], r["used"], r["expires_at"])
                for r in rows
            },
            "draws": [(r["reference"], r["status"]) for r in draws],
            "counter": counter,
            "problems": await run_checks(conn),
        }

    found = _run(at_0003, after)
    assert isinstance(found, dict)
    end = next_period_start(now)
    assert found["allowances"] == {(plus, this): (10, 4, end), (pro, this): (25, 0, end)}
    assert found["draws"] == [(f"carried:{plus}:{this}:{n}", "confirmed") for n in (1, 2, 3)] + [
        (f"enhancement:{running}", "active")
    ]
    assert found["counter"] is None
    assert found["problems"] == []
