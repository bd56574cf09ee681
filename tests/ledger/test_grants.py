from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from services.kit.outbox import signed_fields
from tests.ledger.helpers import balance, key, operator, penora


async def grant(ledger, user, amount, **extra):
    r = await ledger.post(
        "/v1/ledger/grants",
        json={"user_id": user, "amount": amount, "source": "promo", **extra},
        headers={**operator(), **key()},
    )
    assert r.status_code == 201, r.text
    return r.json()


class TestGrantExpiry:
    async def test_expired_credit_is_never_spendable(self, ledger, funded_user):
        user = await funded_user(0)
        soon = datetime.now(UTC) + timedelta(seconds=1)
        await grant(ledger, user, 10, expires_at=soon.isoformat())
        await grant(ledger, user, 2)
        assert (await balance(ledger, user))["available"] == 12
        await asyncio.sleep(1.2)
        # The expiry job has not run: the balance is right anyway.
        b = await balance(ledger, user)
        assert b["available"] == 2 and b["next_expiry"] is None
        r = await ledger.post(
            "/v1/ledger/debits", json={"user_id": user, "amount": 3}, headers={**penora(), **key()}
        )
        assert r.status_code == 402 and r.json()["error"]["detail"]["available"] == 2

    async def test_expiry_job_moves_expired_credit_out(self, ledger, funded_user, ku_database_url):
        import asyncpg

        from services.kit.db import plain_url
        from services.ledger.tasks import expire_grants
        from services.ledger.verify import verify

        user = await funded_user(0)
        await grant(
            ledger, user, 4, expires_at=(datetime.now(UTC) + timedelta(seconds=1)).isoformat()
        )
        await asyncio.sleep(1.2)
        pool = await asyncpg.create_pool(plain_url(ku_database_url), min_size=1, max_size=2)
        try:
            assert await expire_grants(pool) >= 1
            assert await expire_grants(pool) == 0  # safe to run twice
            wallet = await pool.fetchrow("SELECT * FROM ledger.wallets WHERE user_id = $1", user)
        finally:
            await pool.close()
        assert wallet["balance_milli"] == 0
        txs = await ledger.get(
            "/v1/ledger/transactions", params={"user_id": user}, headers=operator()
        )
        assert txs.json()["items"][0]["kind"] == "grant_expiry"
        assert await verify(plain_url(ku_database_url)) == []

    async def test_soonest_expiring_is_spent_first(self, ledger, funded_user):
        user = await funded_user(0)
        now = datetime.now(UTC)
        await grant(ledger, user, 5)  # never expires
        await grant(ledger, user, 5, expires_at=(now + timedelta(days=30)).isoformat())
        await grant(ledger, user, 5, expires_at=(now + timedelta(days=2)).isoformat())
        r = await ledger.post(
            "/v1/ledger/debits", json={"user_id": user, "amount": 7}, headers={**penora(), **key()}
        )
        assert r.status_code == 201
        b = await balance(ledger, user)
        assert b["available"] == 8
        # 5 from the 2-day grant, 2 from the 30-day grant; the permanent grant untouched.
        assert b["next_expiry"]["amount"] == 3
        assert datetime.fromisoformat(b["next_expiry"]["at"]) > now + timedelta(days=29)

    async def test_grant_in_the_past_is_rejected(self, ledger, funded_user):
        user = await funded_user(0)
        r = await ledger.post(
            "/v1/ledger/grants",
            json={
                "user_id": user,
                "amount": 1,
                "source": "promo",
                "expires_at": (datetime.now(UTC) - timedelta(seconds=5)).isoformat(),
            },
            headers={**operator(), **key()},
        )
        assert r.status_code == 422 and r.json()["error"]["code"] == "already_expired"

    async def test_grants_need_the_grant_scope(self, ledger, funded_user):
        user = await funded_user(0)
        r = await ledger.post(
            "/v1/ledger/grants",
            json={"user_id": user, "amount": 1000, "source": "promo"},
            headers={**penora(), **key()},
        )
        assert r.status_code == 403
        assert (await balance(ledger, user))["available"] == 0


class TestWelcome:
    async def test_user_created_grants_welcome_once(self, ledger, new_user_id):
        """Three deliveries of the same user.created (and a direct open) → one 50 Ku grant."""
        import os

        import orjson
        from redis.asyncio import Redis

        user = new_user_id()
        redis = Redis.from_url(os.environ["KU_REDIS_URL"])
        stream = f"{os.environ['KU_BUS_PREFIX']}.events.auth"
        try:
            for n in range(3):
                await redis.xadd(
                    stream,
                    signed_fields(
                        "auth",
                        f"evt-{user}-{n}",
                        "user.created",
                        orjson.dumps({"user_id": user}).decode(),
                    ),
                )
        finally:
            await redis.aclose()
        opened = await ledger.post(
            "/v1/ledger/accounts", json={"user_id": user}, headers=operator()
        )
        assert opened.status_code in (200, 201)
        for _ in range(50):
            r = await ledger.get("/v1/ledger/balance", params={"user_id": user}, headers=operator())
            if r.status_code == 200 and r.json()["available"] == 50:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # let every delivery be handled
        b = await balance(ledger, user)
        assert b["available"] == 50
        txs = await ledger.get(
            "/v1/ledger/transactions", params={"user_id": user}, headers=operator()
        )
        assert [t["kind"] for t in txs.json()["items"]] == ["grant"]


class TestForgedEvents:
    async def test_a_forged_user_created_grants_nothing(self, ledger, new_user_id):
        """Entries written straight to Redis, unsigned or signed by another service, open
        no account and grant no welcome credits."""
        import os

        import orjson
        from redis.asyncio import Redis

        user = new_user_id()
        payload = orjson.dumps({"user_id": user}).decode()
        redis = Redis.from_url(os.environ["KU_REDIS_URL"])
        stream = f"{os.environ['KU_BUS_PREFIX']}.events.auth"
        try:
            unsigned = {"id": f"f1-{user}", "topic": "user.created", "payload": payload}
            await redis.xadd(stream, unsigned)
            await redis.xadd(
                stream, signed_fields("workspace", f"f2-{user}", "user.created", payload)
            )
            claims_auth = signed_fields("generation", f"f3-{user}", "user.created", payload)
            claims_auth["issuer"] = "auth"
            await redis.xadd(stream, claims_auth)
            # A genuine event after them, as the marker that the consumer got this far.
            marker = new_user_id()
            marker_payload = orjson.dumps({"user_id": marker}).decode()
            await redis.xadd(
                stream, signed_fields("auth", f"ok-{marker}", "user.created", marker_payload)
            )
        finally:
            await redis.aclose()
        for _ in range(100):
            r = await ledger.get(
                "/v1/ledger/balance", params={"user_id": marker}, headers=operator()
            )
            if r.status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert r.status_code == 200
        r = await ledger.get("/v1/ledger/balance", params={"user_id": user}, headers=operator())
        assert r.status_code == 404
