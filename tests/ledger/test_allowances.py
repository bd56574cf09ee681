"""Monthly allowances in the ledger: units (e.g. included enhancements), not Ku.

Grants are "at least N", draws are once per reference and provisional (confirm, return,
or expire past their TTL), and the way back never gives more than was taken: a return
twice, a return of a reference never drawn, a return after the period ended. Real
Postgres; the race for the last unit runs in two ledger processes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest

from services.kit.db import plain_url
from services.kit.testing.plugin import principal_headers
from services.ledger import tasks
from services.ledger.allowances import period_end, period_of
from services.ledger.verify import run_checks, verify
from tests.ledger.helpers import admin, key, operator
from tests.ledger.test_two_processes import two_ledgers  # noqa: F401  (the fixture)

BASE = "/v1/ledger/allowances"


def enhancement() -> dict[str, str]:
    """The enhancement service, as its service client signs it (issuer: itself)."""
    return {**principal_headers("service", app="enhancement", scopes=()), **key()}


def generation() -> dict[str, str]:
    return {**principal_headers("service", app="generation", scopes=()), **key()}


def this_period() -> str:
    return period_of(datetime.now(UTC))


@pytest.fixture
def user(new_user_id: Callable[[], str]) -> str:
    return new_user_id()


@pytest.fixture
async def db(ku_database_url: str) -> Any:
    conn = await asyncpg.connect(plain_url(ku_database_url))
    yield conn
    await conn.close()


async def grant(
    ledger: httpx.AsyncClient, user: str, units: int, period: str | None = None
) -> httpx.Response:
    body = {"user_id": user, "kind": "enhancement", "period": period or this_period()}
    return await ledger.post(f"{BASE}/grants", json={**body, "units": units}, headers=enhancement())


async def draw(
    ledger: httpx.AsyncClient, user: str, reference: str, **extra: Any
) -> httpx.Response:
    body = {
        "user_id": user,
        "kind": "enhancement",
        "period": this_period(),
        "reference": reference,
        **extra,
    }
    return await ledger.post(f"{BASE}/draws", json=body, headers=enhancement())


async def resolve(ledger: httpx.AsyncClient, reference: str, how: str) -> httpx.Response:
    return await ledger.post(f"{BASE}/draws/{reference}/{how}", headers=enhancement())


async def state(ledger: httpx.AsyncClient, user: str) -> dict[str, Any]:
    r = await ledger.get(BASE, params={"user_id": user}, headers=operator())
    assert r.status_code == 200, r.text
    (item,) = r.json()["items"]
    return dict(item)


async def entries(db: asyncpg.Connection, user: str) -> list[tuple[str, int, int, str | None]]:
    rows = await db.fetch(
        "SELECT entry, granted_delta, used_delta, reference FROM ledger.allowance_entries"
        " WHERE user_id = $1 ORDER BY id",
        user,
    )
    return [(r["entry"], r["granted_delta"], r["used_delta"], r["reference"]) for r in rows]


def ref() -> str:
    return f"enhancement:{uuid.uuid4()}"


class TestGrant:
    async def test_at_least_n_raising_twice_is_one_increase(self, ledger, user, db):
        r = await grant(ledger, user, 10)
        assert r.status_code == 201, r.text
        assert r.json()["increased_by"] == 10
        assert r.json()["allowance"]["expires_at"].startswith(
            period_end(this_period()).strftime("%Y-%m-%dT00:00:00")
        )
        again = await grant(ledger, user, 10)
        assert again.status_code == 200 and again.json()["increased_by"] == 0
        assert again.headers["Idempotent-Replayed"] == "true"
        lower = await grant(ledger, user, 4)  # a lower N changes nothing
        assert lower.status_code == 200 and lower.json()["allowance"]["granted"] == 10
        up = await grant(ledger, user, 25)  # an upgrade mid-month
        assert up.status_code == 201 and up.json()["increased_by"] == 15
        assert (await state(ledger, user))["granted"] == 25
        assert await entries(db, user) == [("grant", 10, 0, None), ("grant", 15, 0, None)]

    async def test_units_not_ku(self, ledger, funded_user, db):
        user = await funded_user(5)
        before = (await ledger.get("/v1/ledger/balance", params={"user_id": user},
                                   headers=operator())).json()  # fmt: skip
        assert (await grant(ledger, user, 10)).status_code == 201
        assert (await draw(ledger, user, ref())).status_code == 201
        after = (await ledger.get("/v1/ledger/balance", params={"user_id": user},
                                  headers=operator())).json()  # fmt: skip
        assert after == before  # no balance, no lot, no journal transaction
        assert (
            await db.fetchval("SELECT count(*) FROM ledger.transactions WHERE user_id = $1", user)
            == 1
        )  # the promo grant of the fixture only

    async def test_an_ended_period_is_refused(self, ledger, user):
        r = await grant(ledger, user, 10, period="2000-01")
        assert r.status_code == 422 and r.json()["error"]["code"] == "period_ended"


class TestDraw:
    async def test_idempotent_by_reference(self, ledger, user, db):
        await grant(ledger, user, 10)
        reference = ref()
        first = await draw(ledger, user, reference)
        assert first.status_code == 201, first.text
        assert first.json()["draw"]["status"] == "active"
        assert first.json()["allowance"]["used"] == 1
        again = await draw(ledger, user, reference)
        assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
        assert again.json()["draw"] == first.json()["draw"]
        assert (await state(ledger, user))["used"] == 1
        other = await draw(ledger, "someone-else", reference)  # the same reference elsewhere
        assert other.status_code == 409 and other.json()["error"]["code"] == "reference_reused"
        assert [e[0] for e in await entries(db, user)] == ["grant", "draw"]

    async def test_exhausted_is_402_and_records_nothing(self, ledger, user, db):
        await grant(ledger, user, 2)
        assert [(await draw(ledger, user, ref())).status_code for _ in range(2)] == [201, 201]
        r = await draw(ledger, user, ref())
        assert r.status_code == 402
        error = r.json()["error"]
        assert error["code"] == "allowance_exhausted"
        assert error["detail"] == {"granted": 2, "used": 2, "remaining": 0}
        assert [e[0] for e in await entries(db, user)] == ["grant", "draw", "draw"]
        none = await draw(ledger, "never-granted-" + uuid.uuid4().hex[:8], ref())
        assert none.status_code == 402 and none.json()["error"]["code"] == "allowance_exhausted"

    async def test_cap_is_the_callers_entitlement(self, ledger, user):
        await grant(ledger, user, 25)  # granted as Pro, then downgraded to Plus (10)
        for _ in range(3):
            assert (await draw(ledger, user, ref(), cap=3)).status_code == 201
        r = await draw(ledger, user, ref(), cap=3)
        assert r.status_code == 402 and r.json()["error"]["code"] == "allowance_exhausted"
        assert (await draw(ledger, user, ref(), cap=4)).status_code == 201


class TestConfirmAndReturn:
    async def test_confirm_once(self, ledger, user, db):
        await grant(ledger, user, 10)
        reference = ref()
        await draw(ledger, user, reference)
        r = await resolve(ledger, reference, "confirm")
        assert r.status_code == 200 and r.json()["draw"]["status"] == "confirmed"
        again = await resolve(ledger, reference, "confirm")
        assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
        back = await resolve(ledger, reference, "return")
        assert back.status_code == 409
        assert back.json()["error"]["code"] == "draw_already_confirmed"
        assert (await state(ledger, user))["used"] == 1
        assert [e[0] for e in await entries(db, user)] == ["grant", "draw", "confirm"]

    async def test_return_twice_gives_one_unit_back(self, ledger, user, db):
        await grant(ledger, user, 10)
        reference = ref()
        await draw(ledger, user, reference)
        await draw(ledger, user, ref())  # another, that stays used
        r = await resolve(ledger, reference, "return")
        assert r.status_code == 200 and r.json()["given_back"] is True
        assert r.json()["allowance"]["used"] == 1
        again = await resolve(ledger, reference, "return")
        assert again.status_code == 200 and again.json()["given_back"] is False
        assert again.headers["Idempotent-Replayed"] == "true"
        assert (await state(ledger, user))["used"] == 1  # not 0
        drawn_again = await draw(ledger, user, reference)  # a returned reference stays spent
        assert drawn_again.status_code == 200
        assert drawn_again.json()["draw"]["status"] == "returned"
        confirm = await resolve(ledger, reference, "confirm")
        assert confirm.status_code == 409
        assert confirm.json()["error"]["code"] == "draw_already_returned"
        assert (await state(ledger, user))["used"] == 1
        assert [e[:3] for e in await entries(db, user)] == [
            ("grant", 10, 0),
            ("draw", 0, 1),
            ("draw", 0, 1),
            ("return", 0, -1),
        ]

    async def test_return_of_a_never_drawn_reference_gives_nothing(self, ledger, user, db):
        await grant(ledger, user, 10)
        await draw(ledger, user, ref())
        for how in ("return", "confirm"):
            r = await resolve(ledger, ref(), how)
            assert r.status_code == 404 and r.json()["error"]["code"] == "draw_not_found"
        assert (await state(ledger, user))["used"] == 1
        assert [e[0] for e in await entries(db, user)] == ["grant", "draw"]

    async def test_only_the_drawer_resolves(self, ledger, user, db):
        await grant(ledger, user, 10)
        reference = ref()
        await draw(ledger, user, reference)
        # Another service principal cannot even reach the route (the table); the SQL-side
        # owner check is for a second allowance service: simulate one by renaming the owner.
        await db.execute(
            "UPDATE ledger.allowance_draws SET owner = 'service:other' WHERE reference = $1",
            reference,
        )
        r = await resolve(ledger, reference, "return")
        assert r.status_code == 403 and r.json()["error"]["code"] == "not_your_draw"
        assert (await state(ledger, user))["used"] == 1


class TestPeriodEnd:
    async def test_after_the_period_nothing_is_drawn_or_given_back(self, ledger, user, db):
        await grant(ledger, user, 10)
        reference = ref()
        await draw(ledger, user, reference)
        # The period ends (its end moved into the past, as time passing would).
        await db.execute(
            "UPDATE ledger.allowances SET expires_at = clock_timestamp() - interval '1 second'"
            " WHERE user_id = $1",
            user,
        )
        late = await draw(ledger, user, ref())
        assert late.status_code == 402 and late.json()["error"]["code"] == "allowance_expired"
        back = await resolve(ledger, reference, "return")
        assert back.status_code == 200 and back.json()["given_back"] is False
        allowance = back.json()["allowance"]
        assert (allowance["used"], allowance["remaining"], allowance["expired"]) == (1, 0, True)
        assert [e[:3] for e in await entries(db, user)] == [
            ("grant", 10, 0),
            ("draw", 0, 1),
            ("return", 0, 0),  # recorded, nothing came back
        ]


class TestTtl:
    async def _past_ttl(self, db: asyncpg.Connection, reference: str) -> None:
        await db.execute(
            "UPDATE ledger.allowance_draws SET expires_at = clock_timestamp()"
            " - interval '1 second' WHERE reference = $1",
            reference,
        )

    async def test_the_expiry_sweep_returns_an_unconfirmed_draw(self, ledger, user, db):
        await grant(ledger, user, 10)
        reference = ref()
        await draw(ledger, user, reference, ttl_seconds=60)
        await self._past_ttl(db, reference)
        pool = ledger._transport.app.state.write_pool
        assert await tasks.expire_holds(pool) >= 1  # the ledger's existing sweep
        assert (await state(ledger, user))["used"] == 0
        status = await db.fetchval(
            "SELECT status FROM ledger.allowance_draws WHERE reference = $1", reference
        )
        assert status == "expired"
        confirm = await resolve(ledger, reference, "confirm")
        assert confirm.status_code == 409 and confirm.json()["error"]["code"] == "draw_expired"
        back = await resolve(ledger, reference, "return")  # nothing more comes back
        assert back.status_code == 200 and back.json()["given_back"] is False
        assert (await state(ledger, user))["used"] == 0
        assert [e[:3] for e in await entries(db, user)] == [
            ("grant", 10, 0),
            ("draw", 0, 1),
            ("expiry", 0, -1),
        ]

    async def test_a_confirm_past_the_ttl_expires_it_first(self, ledger, user, db):
        await grant(ledger, user, 10)
        reference = ref()
        await draw(ledger, user, reference)
        await self._past_ttl(db, reference)
        confirm = await resolve(ledger, reference, "confirm")  # before any sweep
        assert confirm.status_code == 409 and confirm.json()["error"]["code"] == "draw_expired"
        assert (await state(ledger, user))["used"] == 0  # the expiry was kept
        assert [e[0] for e in await entries(db, user)] == ["grant", "draw", "expiry"]


class TestAuthority:
    async def test_who_may(self, ledger, user):
        assert (await grant(ledger, user, 1)).status_code == 201
        body = {"user_id": user, "kind": "enhancement", "period": this_period(), "units": 5}
        draw_body = {**body, "reference": ref()}
        draw_body.pop("units")
        for headers in (
            generation(),
            {**operator(), **key()},
            {**admin(), **key()},
            {**principal_headers("user", app="imagegene", user_id=user, scopes=("enhance",))},
        ):
            for path, json in (("grants", body), ("draws", draw_body)):
                r = await ledger.post(f"{BASE}/{path}", json=json, headers=headers)
                assert r.status_code == 403, (path, r.text)
        # Reads: the user's own, any user for first-party apps and the service.
        own = principal_headers("user", app="imagegene", user_id=user, scopes=("ledger:read",))
        assert (await ledger.get(BASE, params={"user_id": user}, headers=own)).status_code == 200
        other = await ledger.get(BASE, params={"user_id": "someone"}, headers=own)
        assert other.status_code == 403
        service = principal_headers("service", app="enhancement", scopes=())
        r = await ledger.get(BASE, params={"user_id": user}, headers=service)
        assert r.status_code == 200 and r.json()["items"][0]["granted"] == 1


class TestVerify:
    async def test_sound_then_a_corrupted_row_is_named(self, ledger, user, db, ku_database_url):
        await grant(ledger, user, 3)
        for how in ("confirm", "return", None):
            reference = ref()
            await draw(ledger, user, reference)
            if how:
                await resolve(ledger, reference, how)
        problems = await verify(plain_url(ku_database_url))
        assert [p for p in problems if p.startswith("allowance")] == []
        tx = db.transaction()
        await tx.start()
        try:
            await db.execute(
                "UPDATE ledger.allowances SET used = used - 1 WHERE user_id = $1", user
            )
            names = {p.split(":", 1)[0] for p in await run_checks(db)}
        finally:
            await tx.rollback()
        assert "allowance_entries" in names


class TestTwoProcesses:
    async def test_one_draw_wins_the_last_unit(self, two_ledgers, ku_database_url):  # noqa: F811
        user = f"race-{uuid.uuid4().hex[:10]}"
        async with httpx.AsyncClient(timeout=60) as client:
            r = await client.post(
                f"{two_ledgers[0]}{BASE}/grants",
                json={"user_id": user, "kind": "enhancement", "period": this_period(),
                      "units": 1},
                headers=enhancement(),
            )  # fmt: skip
            assert r.status_code == 201, r.text

            async def one(i: int) -> int:
                body = {
                    "user_id": user,
                    "kind": "enhancement",
                    "period": this_period(),
                    "reference": ref(),
                }
                r = await client.post(
                    f"{two_ledgers[i % 2]}{BASE}/draws", json=body, headers=enhancement()
                )
                return r.status_code

            statuses = await asyncio.gather(*(one(i) for i in range(40)))
            assert statuses.count(201) == 1 and statuses.count(402) == 39, statuses
            (won,) = await asyncio.gather(
                client.get(f"{two_ledgers[1]}{BASE}", params={"user_id": user}, headers=operator())
            )
            assert won.json()["items"][0]["used"] == 1

            # Returns of one draw racing in both processes: one unit comes back, once.
            reference = await asyncpg_fetchval(
                ku_database_url,
                "SELECT reference FROM ledger.allowance_draws WHERE user_id = $1",
                user,
            )
            backs = await asyncio.gather(
                *(
                    client.post(
                        f"{two_ledgers[i % 2]}{BASE}/draws/{reference}/return",
                        headers=enhancement(),
                    )
                    for i in range(10)
                )
            )
            assert [r.status_code for r in backs] == [200] * 10
            assert [r.json()["given_back"] for r in backs].count(True) == 1
        assert await verify(plain_url(ku_database_url)) == []


async def asyncpg_fetchval(url: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(plain_url(url))
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()
