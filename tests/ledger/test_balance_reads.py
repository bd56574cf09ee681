"""Balance reads in flight share one statement (`repository.BalanceReader`), each
answered with its own user's balance and link, never from a statement that began
before it was asked for."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from services.kit.db import plain_url
from services.ledger.repository import _BALANCES, BalanceReader
from tests.ledger.helpers import admin
from tests.ledger.test_batcher import open_users


@pytest.fixture
async def pool(ku_database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(plain_url(ku_database_url), min_size=1, max_size=4)
    yield p
    await p.close()


class TestShared:
    async def test_concurrent_reads_are_one_statement_each_its_own_answer(self, pool):
        users = [
            *await open_users(pool, 3, 5_000),
            *await open_users(pool, 3, 7_250),
        ]
        reader = BalanceReader(pool)
        reads = [*users, "no-such-user", users[0]]
        found = await asyncio.gather(*(reader.read(user, None) for user in reads))
        assert reader.statements == 1
        assert [f["found"] for f in found] == [True] * 6 + [False, True]
        assert [sum(s["amount_milli"] for s in f["sources"]) for f in found] == [
            *[5_000] * 3,
            *[7_250] * 3,
            0,
            5_000,
        ]
        assert [f["sources"] for f in found[:1]] == [[{"source": "promo", "amount_milli": 5_000}]]
        assert {f["held_milli"] for f in found} == {0}

    async def test_each_read_has_its_own_link(self, pool):
        linked, other = await open_users(pool, 2, 1_000)
        await pool.execute(
            "INSERT INTO ledger.app_links (user_id, app) VALUES ($1, 'partnerq')", linked
        )
        reader = BalanceReader(pool)
        found = await asyncio.gather(
            reader.read(linked, "partnerq"),
            reader.read(other, "partnerq"),
            reader.read(linked, "partnerz"),
            reader.read(linked, None),
        )
        assert reader.statements == 1
        assert [f["linked"] for f in found] == [True, False, False, False]

    async def test_a_read_asked_during_a_statement_waits_for_the_next(self, pool):
        (user,) = await open_users(pool, 1, 3_000)
        reader = BalanceReader(pool, max_inflight=1)
        blocker = await pool.acquire()
        try:
            # The statement reads app_links: it waits for this lock to be planned.
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute("LOCK TABLE ledger.app_links IN ACCESS EXCLUSIVE MODE")
            first = asyncio.create_task(reader.read(user, None))
            for _ in range(200):
                await asyncio.sleep(0.01)
                if await pool.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted"
                    " AND relation = 'ledger.app_links'::regclass"
                ):
                    break
            second = asyncio.create_task(reader.read(user, None))
            await asyncio.sleep(0.05)
            assert reader.statements == 1 and not first.done() and not second.done()
            await tx.rollback()
        finally:
            await pool.release(blocker)
        a, b = await asyncio.gather(first, second)
        assert reader.statements == 2  # the second read had a statement of its own
        assert a["sources"] == b["sources"] == [{"source": "promo", "amount_milli": 3_000}]

    async def test_a_failed_statement_fails_its_reads_and_the_next_runs(self, pool):
        (user,) = await open_users(pool, 1, 2_000)
        reader = BalanceReader(pool)
        # A NUL byte is text Postgres refuses: the whole statement fails, every read in
        # it gets the error, and the reader carries on with the next statement.
        results = await asyncio.gather(
            reader.read(user, None), reader.read("nul\x00user", None), return_exceptions=True
        )
        assert all(isinstance(r, asyncpg.PostgresError) for r in results), results
        again = await reader.read(user, None)
        assert again["found"] and reader.statements == 2


class TestThroughTheApp:
    async def test_concurrent_balance_requests_share_a_statement(
        self, ledger: httpx.AsyncClient, funded_user
    ):
        users = [await funded_user(amount) for amount in (1, 2.5, 4, 8.125)]
        app = ledger._transport.app  # type: ignore[attr-defined]
        reader: BalanceReader = app.state.balances
        before = reader.statements
        answers = await asyncio.gather(
            *(
                ledger.get("/v1/ledger/balance", params={"user_id": u}, headers=admin())
                for u in users * 4
            )
        )
        assert [r.status_code for r in answers] == [200] * 16
        assert [r.json()["available"] for r in answers] == [1, 2.5, 4, 8.125] * 4
        assert [r.json()["user_id"] for r in answers] == users * 4
        assert reader.statements - before < 16

    async def test_the_shared_statement_is_planned_once(self, ledger: httpx.AsyncClient):
        """Left to itself Postgres plans the shared statement afresh on every call (its
        array parameters make the generic plan look dearer): ~1.3 ms of planning for a
        read that runs in ~0.05 ms, three times a single read's cost at one client.
        The reader's connections force the generic plan."""
        app = ledger._transport.app  # type: ignore[attr-defined]
        reader: BalanceReader = app.state.balances
        async with reader.pool.acquire() as conn:
            assert await conn.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
            statement = await conn.prepare(_BALANCES)
            for n in range(1, 8):  # past the five custom plans Postgres tries first
                await statement.fetch([f"nobody-{i}" for i in range(n)], [None] * n)
            custom, generic = await conn.fetchrow(
                "SELECT sum(custom_plans), sum(generic_plans) FROM pg_prepared_statements"
                " WHERE statement = $1",
                _BALANCES,
            )
        assert (custom, generic >= 7) == (0, True)

    async def test_the_answer_is_the_models_json_byte_for_byte(
        self, ledger: httpx.AsyncClient, funded_user
    ):
        """Two sources, a hold, an expiring grant: the bytes are those of the response
        model built field by field (what the route sent before it validated once)."""
        from datetime import UTC, datetime, timedelta

        from services.ledger.schemas import Balance, NextExpiry, SourceBalance
        from tests.ledger.helpers import key, operator

        soon = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
        user = await funded_user(12.5, expires_at=soon.isoformat())
        r = await ledger.post(
            "/v1/ledger/grants",
            json={"user_id": user, "amount": 0.75, "source": "purchase"},
            headers={**operator(), **key()},
        )
        assert r.status_code == 201, r.text
        r = await ledger.post(
            "/v1/ledger/holds",
            json={"user_id": user, "amount": 1.25, "app": "penora", "ttl_seconds": 60},
            headers={**operator(), **key()},
        )
        assert r.status_code == 201, r.text
        r = await ledger.get("/v1/ledger/balance", params={"user_id": user}, headers=admin())
        assert r.status_code == 200, r.text
        shown = r.json()
        expected = Balance(
            user_id=user,
            available=12_000,
            held=1_250,
            debt=0,
            total=13_250,
            by_source=[
                SourceBalance(source=s["source"], available=round(s["available"] * 1000))
                for s in shown["by_source"]
            ],
            next_expiry=NextExpiry(at=soon, amount=round(shown["next_expiry"]["amount"] * 1000)),
        )
        assert r.content == expected.model_dump_json().encode()
        assert {s["source"] for s in shown["by_source"]} == {"promo", "purchase"}
