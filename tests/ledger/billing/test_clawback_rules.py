"""Billing refunds through the webhook, against the ledger's clawback rules: credit
sitting in a hold is taken back from the hold; an expired payment lot claws nothing."""

from __future__ import annotations

import asyncpg

from services.kit.db import plain_url
from services.ledger.verify import verify
from tests.ledger.billing.helpers import deliver, paid_order
from tests.ledger.helpers import balance, key, operator, penora


async def buy(ledger, razorpay, user_id: str, item: str) -> dict:
    _, payment = await paid_order(ledger, razorpay, user_id, item)
    r = await deliver(ledger, razorpay.webhook("payment.captured", payment=payment))
    assert r.json()["outcome"] == "granted", r.text
    return payment


async def refund_all(ledger, razorpay, payment: dict):
    refund = razorpay.refund(payment["id"])
    r = await deliver(
        ledger,
        razorpay.webhook(
            "refund.processed", refund=refund, payment=razorpay.payments[payment["id"]]
        ),
    )
    assert r.status_code == 200, r.text
    return r


class TestClawbackThroughBilling:
    async def test_refund_takes_back_credit_held_by_an_app(
        self, ledger, razorpay, buyer, ku_database_url
    ):
        user = await buyer()
        payment = await buy(ledger, razorpay, user, "topup_25")
        r = await ledger.post(
            "/v1/ledger/holds", json={"user_id": user, "amount": 20}, headers={**penora(), **key()}
        )
        hold = r.json()["hold"]
        await refund_all(ledger, razorpay, payment)
        b = await balance(ledger, user)
        assert (b["available"], b["held"], b["debt"]) == (0, 0, 0)
        got = (await ledger.get(f"/v1/ledger/holds/{hold['id']}", headers=operator())).json()
        assert (got["status"], got["clawed"]) == ("clawed", 20)
        assert await verify(plain_url(ku_database_url)) == []

    async def test_refund_after_the_lot_expired_claws_nothing(
        self, ledger, razorpay, buyer, ku_database_url
    ):
        user = await buyer(7)
        payment = await buy(ledger, razorpay, user, "topup_10")
        conn = await asyncpg.connect(plain_url(ku_database_url))
        try:
            # The period the payment paid for is over: its lot expired unused.
            await conn.execute(
                "UPDATE ledger.grants SET expires_at = clock_timestamp() - interval '1 day'"
                " WHERE user_id = $1 AND reference = $2",
                user,
                payment["id"],
            )
        finally:
            await conn.close()
        await refund_all(ledger, razorpay, payment)
        b = await balance(ledger, user)
        assert (b["available"], b["debt"]) == (7, 0)
        assert await verify(plain_url(ku_database_url)) == []
