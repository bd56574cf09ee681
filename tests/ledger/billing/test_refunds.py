"""Refunds claw back what the payment granted; what was spent becomes a debt that the
next grants settle, and every ledger invariant still holds."""

from __future__ import annotations

import time

from services.kit.db import plain_url
from services.ledger.verify import verify
from tests.ledger.billing.helpers import deliver, grants, paid_order, payments
from tests.ledger.helpers import admin, balance, key, penora


async def spend(ledger, user_id: str, amount: int) -> None:
    r = await ledger.post(
        "/v1/ledger/debits",
        json={"user_id": user_id, "amount": amount, "app": "penora"},
        headers={**penora(), **key()},
    )
    assert r.status_code == 201, r.text


async def debt(ku_database_url: str, user_id: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(plain_url(ku_database_url))
    try:
        return await conn.fetchval(
            "SELECT debt_milli FROM ledger.wallets WHERE user_id = $1", user_id
        )
    finally:
        await conn.close()


async def buy(ledger, razorpay, user_id: str, item: str) -> dict:
    _, payment = await paid_order(ledger, razorpay, user_id, item)
    r = await deliver(ledger, razorpay.webhook("payment.captured", payment=payment))
    assert r.json()["outcome"] == "granted", r.text
    return payment


class TestRefunds:
    async def test_refund_after_partial_spend(self, ledger, razorpay, buyer, ku_database_url):
        user = await buyer(5)  # 5 Ku of promo credit, then buy 25 Ku
        payment = await buy(ledger, razorpay, user, "topup_25")
        await spend(ledger, user, 20)  # 10 Ku left
        refund = razorpay.refund(payment["id"])
        delivery = razorpay.webhook(
            "refund.processed", refund=refund, payment=razorpay.payments[payment["id"]]
        )
        r = await deliver(ledger, delivery)
        assert r.status_code == 200 and r.json()["outcome"] == "clawed_back", r.text
        b = await balance(ledger, user)
        assert b["available"] == 0 and b["total"] == 0
        assert await debt(ku_database_url, user) == 15_000
        (row,) = await payments(ledger, user)
        assert row["status"] == "refunded" and row["refunded"] == 300
        assert row["clawed_back"] == 10 and row["debt"] == 15
        assert await verify(plain_url(ku_database_url)) == []
        # Redelivered, or sent again under a new event id: still one clawback.
        await deliver(ledger, delivery)
        again = razorpay.webhook(
            "refund.processed", refund=refund, payment=razorpay.payments[payment["id"]]
        )
        assert (await deliver(ledger, again)).json()["outcome"] == "duplicate_refund"
        assert await debt(ku_database_url, user) == 15_000
        # The next grants settle the debt first.
        await buy(ledger, razorpay, user, "topup_10")
        assert (await balance(ledger, user))["available"] == 0
        assert await debt(ku_database_url, user) == 5_000
        await buy(ledger, razorpay, user, "topup_50")
        assert (await balance(ledger, user))["available"] == 45
        assert await debt(ku_database_url, user) == 0
        assert await verify(plain_url(ku_database_url)) == []
        r = await ledger.get("/v1/ledger/transactions", params={"user_id": user}, headers=admin())
        kinds = [t["kind"] for t in r.json()["items"]]
        assert kinds.count("clawback") == 1 and kinds.count("grant") == 4

    async def test_partial_refunds_claw_back_their_share(
        self, ledger, razorpay, buyer, ku_database_url
    ):
        user = await buyer()
        payment = await buy(ledger, razorpay, user, "topup_50")  # 50 Ku for 500 cents
        for cents, left, status in ((200, 30, "partially_refunded"), (300, 0, "refunded")):
            refund = razorpay.refund(payment["id"], cents)
            await deliver(
                ledger,
                razorpay.webhook(
                    "refund.processed", refund=refund, payment=razorpay.payments[payment["id"]]
                ),
            )
            assert (await balance(ledger, user))["available"] == left
            (row,) = await payments(ledger, user)
            assert row["status"] == status
        assert await debt(ku_database_url, user) == 0
        assert await verify(plain_url(ku_database_url)) == []

    async def test_refund_that_overtakes_the_capture_grants_then_claws_back(
        self, ledger, razorpay, buyer, ku_database_url
    ):
        user = await buyer()
        _, payment = await paid_order(ledger, razorpay, user, "topup_10")
        refund = razorpay.refund(payment["id"])
        await deliver(
            ledger,
            razorpay.webhook(
                "refund.processed", refund=refund, payment=razorpay.payments[payment["id"]]
            ),
        )
        late = await deliver(ledger, razorpay.webhook("payment.captured", payment=payment))
        assert late.json()["outcome"] == "already_granted"
        assert len(await grants(ledger, user)) == 1
        assert (await balance(ledger, user))["available"] == 0
        assert await debt(ku_database_url, user) == 0
        assert await verify(plain_url(ku_database_url)) == []


class TestRefundBeforeItsPayment:
    """A refund of a subscription payment can overtake `subscription.charged`: the refund
    names a payment we cannot map yet. It is kept pending (202), never dropped."""

    async def _overtaken(self, ledger, razorpay, buyer):
        from tests.ledger.billing.test_subscriptions import subscribe

        user = await buyer()
        rzp = (await subscribe(ledger, user))["razorpay_subscription_id"]
        now = int(time.time())
        payment, state = razorpay.charge_subscription(rzp, now - 60, now + 30 * 86_400)
        refund = razorpay.refund(payment["id"])
        delivery = razorpay.webhook(
            "refund.processed", refund=refund, payment=razorpay.payments[payment["id"]]
        )
        r = await deliver(ledger, delivery)
        assert r.status_code == 202, r.text
        assert r.json() == {
            "status": "pending",
            "event": "refund.processed",
            "outcome": "pending_payment",
        }
        # A redelivery is tried again, not answered "duplicate".
        r = await deliver(ledger, delivery)
        assert r.status_code == 202 and r.json()["outcome"] == "pending_payment", r.text
        return user, payment, state, delivery

    async def test_the_next_delivery_applies_it_once_the_payment_is_known(
        self, ledger, razorpay, buyer, ku_database_url
    ):
        user, payment, state, delivery = await self._overtaken(ledger, razorpay, buyer)
        charged = razorpay.webhook("subscription.charged", subscription=state, payment=payment)
        assert (await deliver(ledger, charged)).json()["outcome"] == "granted"
        assert (await balance(ledger, user))["available"] == 500
        r = await deliver(ledger, delivery)
        assert r.status_code == 200 and r.json()["status"] == "processed", r.text
        assert r.json()["outcome"] == "clawed_back"
        r = await deliver(ledger, delivery)
        assert r.status_code == 200 and r.json()["status"] == "duplicate"
        assert (await balance(ledger, user))["available"] == 0
        (row,) = await payments(ledger, user)
        assert row["status"] == "refunded" and row["clawed_back"] == 500
        assert await debt(ku_database_url, user) == 0
        assert await verify(plain_url(ku_database_url)) == []

    async def test_reconcile_applies_it_and_closes_the_event(
        self, ledger, razorpay, buyer, ku_database_url
    ):
        from services.ledger.billing.tasks import reconcile

        user, payment, _, delivery = await self._overtaken(ledger, razorpay, buyer)
        counts = await reconcile()
        assert not counts.get("errors"), counts
        assert counts.get("pending_refund_refund_already_applied", 0) >= 1, counts
        assert (await balance(ledger, user))["available"] == 0
        (row,) = await payments(ledger, user)
        assert row["granted"] == 500 and row["clawed_back"] == 500 and row["status"] == "refunded"
        # The event is closed: a redelivery is a duplicate, and nothing is clawed twice.
        r = await deliver(ledger, delivery)
        assert r.status_code == 200 and r.json()["status"] == "duplicate", r.text
        again = await reconcile()
        assert not again.get("errors") and not any(k.startswith("pending_") for k in again)
        r = await ledger.get("/v1/ledger/transactions", params={"user_id": user}, headers=admin())
        kinds = [t["kind"] for t in r.json()["items"]]
        assert kinds.count("clawback") == 1 and kinds.count("grant") == 1
        assert await verify(plain_url(ku_database_url)) == []

    async def test_it_stays_pending_while_razorpay_cannot_tell(
        self, ledger, razorpay, buyer, ku_database_url
    ):
        from services.ledger.billing.tasks import reconcile

        user, payment, _, delivery = await self._overtaken(ledger, razorpay, buyer)
        hidden = razorpay.payments.pop(payment["id"])  # Razorpay: "no such payment" (400)
        try:
            counts = await reconcile()
        finally:
            razorpay.payments[payment["id"]] = hidden
        assert counts.get("errors", 0) >= 1, counts
        r = await deliver(ledger, delivery)
        assert r.status_code == 202 and r.json()["status"] == "pending"
        assert await grants(ledger, user) == []
        counts = await reconcile()  # Razorpay knows it again: granted, clawed back, closed
        assert counts.get("pending_refund_refund_already_applied", 0) >= 1, counts
        assert (await balance(ledger, user))["available"] == 0
        assert (await deliver(ledger, delivery)).json()["status"] == "duplicate"
        assert await verify(plain_url(ku_database_url)) == []
