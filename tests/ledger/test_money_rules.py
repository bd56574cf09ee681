"""Credit that comes back obeys the rules credit going out does (issue 9): each
scenario the review reproduced, as a regression test against the real ledger.

"Time passes" by moving a lot's `expires_at` into the past (what time does to it);
clawbacks are the billing operation, applied straight through `ledger.apply`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from services.kit.db import plain_url
from tests.ledger.helpers import balance, key, operator, penora

BILLING_AUTH = {"user": "any", "owner": "service:billing", "holds": "*", "charges": "*"}


@pytest.fixture
async def db(ku_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(plain_url(ku_database_url))
    yield conn
    await conn.close()


async def apply(db: asyncpg.Connection, op: dict[str, Any]) -> dict[str, Any]:
    raw = await db.fetchval("SELECT ledger.apply($1::jsonb)::text", orjson.dumps(op).decode())
    return orjson.loads(raw)


async def clawback(db, user: str, payment: str, amount_milli: int) -> dict[str, Any]:
    result = await apply(
        db,
        {
            "op": "clawback",
            "user_id": user,
            "amount": amount_milli,
            "source": "purchase",
            "grant_reference": payment,
            "reference": f"rfnd_{uuid.uuid4().hex[:8]}",
            "app": "billing",
            "auth": BILLING_AUTH,
        },
    )
    assert result["status"] == 201, result
    return result["body"]


async def grant(ledger, user: str, amount, **extra) -> dict[str, Any]:
    r = await ledger.post(
        "/v1/ledger/grants",
        json={"user_id": user, "amount": amount, "source": "promo", **extra},
        headers={**operator(), **key()},
    )
    assert r.status_code == 201, r.text
    return r.json()


async def pay(ledger, user: str, amount, **extra) -> str:
    """A payment's grant, as billing books it (source purchase, reference = payment)."""
    payment = f"pay_{uuid.uuid4().hex[:10]}"
    await grant(ledger, user, amount, source="purchase", reference=payment, **extra)
    return payment


async def debit(ledger, user: str, amount) -> int:
    r = await ledger.post(
        "/v1/ledger/debits", json={"user_id": user, "amount": amount}, headers={**penora(), **key()}
    )
    assert r.status_code == 201, r.text
    return r.json()["transaction_id"]


async def hold(ledger, user: str, amount) -> dict[str, Any]:
    r = await ledger.post(
        "/v1/ledger/holds", json={"user_id": user, "amount": amount}, headers={**penora(), **key()}
    )
    assert r.status_code == 201, r.text
    return r.json()["hold"]


async def refund(ledger, tx: int, amount=None):
    body: dict[str, Any] = {"transaction_id": tx}
    if amount is not None:
        body["amount"] = amount
    return await ledger.post("/v1/ledger/refunds", json=body, headers={**penora(), **key()})


async def time_passes(db, user: str, source: str) -> None:
    """The user's `source` lots reach their expiry."""
    await db.execute(
        "UPDATE ledger.grants SET expires_at = clock_timestamp() - interval '1 second'"
        " WHERE user_id = $1 AND source = $2",
        user,
        source,
    )


async def expired_total(db, user: str) -> int:
    return await db.fetchval(
        "SELECT COALESCE(SUM(expired_milli), 0) FROM ledger.grants WHERE user_id = $1", user
    )


TOMORROW = (datetime.now(UTC) + timedelta(days=1)).isoformat()


class TestRefundKeepsExpiry:
    async def test_refund_returns_to_the_lot_with_its_expiry(self, ledger, funded_user, db):
        user = await funded_user(0)
        await grant(ledger, user, 10, expires_at=TOMORROW)
        tx = await debit(ledger, user, 4)
        assert (await refund(ledger, tx)).status_code == 201
        b = await balance(ledger, user)
        assert b["available"] == 10 and b["next_expiry"]["amount"] == 10
        assert [s["source"] for s in b["by_source"]] == ["promo"]
        # No never-expiring `refund` lot: when the promo lot expires, all of it does.
        await time_passes(db, user, "promo")
        assert (await balance(ledger, user))["available"] == 0

    async def test_refund_after_the_lot_expired_comes_back_expired(self, ledger, funded_user, db):
        user = await funded_user(0)
        await grant(ledger, user, 10, expires_at=TOMORROW)
        tx = await debit(ledger, user, 4)
        await time_passes(db, user, "promo")
        r = await refund(ledger, tx)
        assert r.status_code == 201, r.text
        assert r.json()["amount"] == 4 and r.json()["expired"] == 4
        assert (await balance(ledger, user))["available"] == 0
        assert await expired_total(db, user) == 4000


async def hold_changed_event(db: Any, hold_id: str) -> dict[str, Any]:
    """The `hold.changed` event for a hold: still in the outbox, or already relayed."""
    import os

    from redis.asyncio import Redis

    from services.kit.outbox import decode_events, stream_name

    redis = Redis.from_url(os.environ["KU_REDIS_URL"])
    try:
        for _ in range(50):
            row = await db.fetchval(
                "SELECT payload FROM ledger.outbox WHERE topic = 'hold.changed'"
                " AND payload->'hold'->>'id' = $1",
                hold_id,
            )
            if row is not None:
                return dict(orjson.loads(row))
            stream = stream_name(os.environ["KU_BUS_PREFIX"], "ledger")
            for _, fields in await redis.xrange(stream):
                for event in decode_events(fields):  # a batch entry holds several
                    if (
                        event["topic"] == "hold.changed"
                        and event["payload"]["hold"]["id"] == hold_id
                    ):
                        return dict(event["payload"])
            await asyncio.sleep(0.1)
    finally:
        await redis.aclose()
    raise AssertionError(f"no hold.changed event for {hold_id}")


class TestClawbackAndHolds:
    async def test_clawback_takes_credit_sitting_in_a_hold(self, ledger, funded_user, db):
        user = await funded_user(0)
        payment = await pay(ledger, user, 10)
        h = await hold(ledger, user, 8)
        body = await clawback(db, user, payment, 10_000)
        assert body["taken_milli"] == 10_000 and body["debt_added_milli"] == 0
        assert body["held_taken_milli"] == 8_000
        got = await ledger.get(f"/v1/ledger/holds/{h['id']}", headers=operator())
        assert got.json()["status"] == "clawed" and got.json()["clawed"] == 8
        event = await hold_changed_event(db, h["id"])
        assert event["owner"] == "app:penora"
        b = await balance(ledger, user)
        assert (b["available"], b["held"], b["debt"]) == (0, 0, 0)

    async def test_release_after_clawback_gives_back_only_what_is_left(
        self, ledger, funded_user, db
    ):
        user = await funded_user(0)
        payment = await pay(ledger, user, 10)
        h = await hold(ledger, user, 8)
        await clawback(db, user, payment, 5_000)  # 2 from the lot, 3 from the hold
        got = (await ledger.get(f"/v1/ledger/holds/{h['id']}", headers=operator())).json()
        assert (got["status"], got["clawed"]) == ("active", 3)
        r = await ledger.post(f"/v1/ledger/holds/{h['id']}/release", headers=penora())
        assert r.status_code == 200, r.text
        b = await balance(ledger, user)
        assert (b["available"], b["held"], b["debt"]) == (5, 0, 0)

    async def test_capture_of_a_shrunk_hold_is_bounded_by_what_is_left(
        self, ledger, funded_user, db
    ):
        user = await funded_user(0)
        payment = await pay(ledger, user, 10)
        h = await hold(ledger, user, 8)
        await clawback(db, user, payment, 5_000)
        over = await ledger.post(
            f"/v1/ledger/holds/{h['id']}/capture", json={"amount": 6}, headers=penora()
        )
        assert over.status_code == 422 and over.json()["error"]["code"] == "capture_exceeds_hold"
        r = await ledger.post(f"/v1/ledger/holds/{h['id']}/capture", headers=penora())
        assert r.status_code == 200 and r.json()["hold"]["captured"] == 5


class TestDebt:
    async def test_refund_and_release_settle_debt_first(self, ledger, funded_user, db):
        user = await funded_user(3)  # promo 3
        h = await hold(ledger, user, 3)  # held from the promo lot
        payment = await pay(ledger, user, 10)
        tx = await debit(ledger, user, 10)  # spent the payment's lot
        body = await clawback(db, user, payment, 10_000)
        assert body["debt_added_milli"] == 10_000
        b = await balance(ledger, user)
        assert (b["available"], b["held"], b["debt"]) == (0, 3, 10)
        r = await ledger.post(f"/v1/ledger/holds/{h['id']}/release", headers=penora())
        assert r.status_code == 200
        b = await balance(ledger, user)
        assert (b["available"], b["debt"]) == (0, 7)
        r = await refund(ledger, tx)
        assert r.status_code == 201 and r.json()["debt_settled"] == 7
        b = await balance(ledger, user)
        assert (b["available"], b["debt"]) == (3, 0)

    async def test_nothing_is_spendable_beside_debt(self, ledger, funded_user, db):
        user = await funded_user(0)
        payment = await pay(ledger, user, 10)
        await debit(ledger, user, 10)
        await clawback(db, user, payment, 10_000)
        await grant(ledger, user, 4)  # settles 4 of the 10
        b = await balance(ledger, user)
        assert (b["available"], b["debt"]) == (0, 6)
        r = await ledger.post(
            "/v1/ledger/debits", json={"user_id": user, "amount": 1}, headers={**penora(), **key()}
        )
        assert r.status_code == 402

    async def test_clawback_takes_spent_part_from_other_credit_before_debt(
        self, ledger, funded_user, db
    ):
        user = await funded_user(10)  # promo 10, never expires
        payment = await pay(ledger, user, 10, expires_at=TOMORROW)  # drawn first
        await debit(ledger, user, 8)  # from the payment's lot
        body = await clawback(db, user, payment, 10_000)  # its 2 left + 8 from promo
        assert (body["taken_milli"], body["debt_added_milli"]) == (10_000, 0)
        b = await balance(ledger, user)
        assert (b["available"], b["debt"]) == (2, 0)
        poorer = await funded_user(5)
        payment = await pay(ledger, poorer, 10, expires_at=TOMORROW)
        await debit(ledger, poorer, 8)
        body = await clawback(db, poorer, payment, 10_000)  # 2 + 5 from promo + 3 debt
        assert (body["taken_milli"], body["debt_added_milli"]) == (7_000, 3_000)
        b = await balance(ledger, poorer)
        assert (b["available"], b["debt"]) == (0, 3)


class TestClawbackCaps:
    async def test_period_refunded_after_its_grant_expired_unused_claws_nothing(
        self, ledger, funded_user, db
    ):
        user = await funded_user(7)
        payment = await pay(ledger, user, 10, expires_at=TOMORROW)
        await time_passes(db, user, "purchase")
        body = await clawback(db, user, payment, 10_000)
        assert (body["amount_milli"], body["taken_milli"], body["debt_added_milli"]) == (0, 0, 0)
        b = await balance(ledger, user)
        assert (b["available"], b["debt"]) == (7, 0)

    async def test_expired_breakage_is_never_clawed(self, ledger, funded_user, db):
        user = await funded_user(0)
        payment = await pay(ledger, user, 10, expires_at=TOMORROW)
        await debit(ledger, user, 4)
        await time_passes(db, user, "purchase")
        body = await clawback(db, user, payment, 10_000)
        assert (body["amount_milli"], body["debt_added_milli"]) == (4_000, 4_000)

    async def test_repeated_clawbacks_never_exceed_the_payment(self, ledger, funded_user, db):
        user = await funded_user(20)
        payment = await pay(ledger, user, 10)
        assert (await clawback(db, user, payment, 6_000))["amount_milli"] == 6_000
        assert (await clawback(db, user, payment, 6_000))["amount_milli"] == 4_000
        assert (await clawback(db, user, payment, 6_000))["amount_milli"] == 0
        assert (await balance(ledger, user))["available"] == 20


class TestExpiryAtTheDecision:
    async def test_capture_never_spends_a_lot_that_expired_while_held(
        self, ledger, funded_user, db
    ):
        user = await funded_user(0)
        await grant(ledger, user, 6, expires_at=TOMORROW)
        await grant(ledger, user, 4, source="compensation")  # never expires, drawn after promo
        h = await hold(ledger, user, 8)  # 6 promo + 2 gift
        await time_passes(db, user, "promo")
        r = await ledger.post(f"/v1/ledger/holds/{h['id']}/capture", headers=penora())
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "hold_partly_expired"
        assert r.json()["error"]["detail"]["capturable"] == 2
        r = await ledger.post(
            f"/v1/ledger/holds/{h['id']}/capture", json={"amount": 2}, headers=penora()
        )
        assert r.status_code == 200, r.text
        b = await balance(ledger, user)
        assert (b["available"], b["held"]) == (2, 0)
        assert await expired_total(db, user) == 6000

    async def test_release_expires_the_part_whose_lot_expired(self, ledger, funded_user, db):
        user = await funded_user(0)
        await grant(ledger, user, 5, expires_at=TOMORROW)
        h = await hold(ledger, user, 5)
        await time_passes(db, user, "promo")
        r = await ledger.post(f"/v1/ledger/holds/{h['id']}/release", headers=penora())
        assert r.status_code == 200
        assert (await balance(ledger, user))["available"] == 0
        assert await expired_total(db, user) == 5000

    async def test_a_batch_decides_expiry_at_each_operation(self, funded_user, db):
        """now() is the start of the transaction; a lot that expires while a batch
        runs is not spendable by the operations after that instant."""
        user = await funded_user(0)
        auth = {"user": "any", "owner": "app:penora"}
        async with db.transaction():
            r = await apply(
                db,
                {
                    "op": "grant",
                    "user_id": user,
                    "amount": 5000,
                    "source": "promo",
                    "expires_at": (datetime.now(UTC) + timedelta(seconds=1)).isoformat(),
                    "auth": auth,
                },
            )
            assert r["status"] == 201
            await db.execute("SELECT pg_sleep(1.2)")
            late = await apply(
                db,
                {"op": "debit", "user_id": user, "amount": 1000, "app": "penora", "auth": auth},
            )
        assert late["status"] == 402, late
