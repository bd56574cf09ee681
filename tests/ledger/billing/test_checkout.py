"""Orders, checkout verification and payment webhooks: one captured payment, one grant."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime

from tests.ledger.billing.helpers import (
    WEBHOOK,
    as_user,
    deliver,
    grants,
    order,
    paid_order,
    payments,
    verify,
)
from tests.ledger.helpers import admin, balance


class TestOrders:
    async def test_order_is_created_at_razorpay_with_our_id_as_receipt(
        self, ledger, razorpay, buyer
    ):
        user = await buyer()
        ours = await order(ledger, user, "topup_25")
        assert ours["amount"] == 300 and ours["currency"] == "USD" and ours["credits"] == 25
        assert ours["key_id"] == razorpay.key_id and ours["status"] == "created"
        remote = razorpay.orders[ours["razorpay_order_id"]]
        assert remote["receipt"] == ours["order_id"] and remote["amount"] == 300

    async def test_order_rules(self, ledger, razorpay, buyer, new_user_id):
        alice, bob = await buyer(), await buyer()
        cases = [
            ({"user_id": bob, "item": "topup_10"}, as_user(alice), 403),
            ({"user_id": alice, "item": "gold_bars"}, as_user(alice), 404),
            ({"user_id": alice}, as_user(alice), 422),
        ]
        stranger = new_user_id()
        cases.append(({"user_id": stranger, "item": "topup_10"}, admin(), 404))
        for payload, headers, status in cases:
            r = await ledger.post("/v1/billing/orders", json=payload, headers=headers)
            assert r.status_code == status, (payload, r.text)
            assert "code" in r.json()["error"]


class TestExactlyOnce:
    async def test_verify_and_webhooks_concurrently_three_times_grant_once(
        self, ledger, razorpay, buyer
    ):
        user = await buyer()
        ours, payment = await paid_order(ledger, razorpay, user, "topup_50")
        signature = razorpay.checkout_signature(ours["razorpay_order_id"], payment["id"])
        captured = razorpay.webhook("payment.captured", payment=payment)
        paid = razorpay.webhook(
            "order.paid", payment=payment, order=razorpay.orders[ours["razorpay_order_id"]]
        )
        for _ in range(3):
            results = await asyncio.gather(
                verify(ledger, user, ours["razorpay_order_id"], payment["id"], signature),
                verify(ledger, user, ours["razorpay_order_id"], payment["id"], signature),
                deliver(ledger, captured),
                deliver(ledger, paid),
                deliver(ledger, captured),
            )
            assert [r.status_code for r in results] == [200] * 5, [r.text for r in results]
        assert len(await grants(ledger, user)) == 1
        assert (await balance(ledger, user))["available"] == 50
        (row,) = await payments(ledger, user)
        assert row["status"] == "captured" and row["granted"] == 50 and row["amount"] == 500

    async def test_verify_alone_grants_and_replays(self, ledger, razorpay, buyer):
        user = await buyer()
        ours, payment = await paid_order(ledger, razorpay, user, "topup_10")
        signature = razorpay.checkout_signature(ours["razorpay_order_id"], payment["id"])
        first = await verify(ledger, user, ours["razorpay_order_id"], payment["id"], signature)
        again = await verify(ledger, user, ours["razorpay_order_id"], payment["id"], signature)
        assert first.json()["outcome"] == "granted", first.text
        assert again.json()["outcome"] == "already_granted"
        assert first.json()["payment"]["granted"] == 10
        assert (await balance(ledger, user))["available"] == 10


class TestRejected:
    async def test_tampered_signature_is_400_and_grants_nothing(self, ledger, razorpay, buyer):
        user = await buyer()
        ours, payment = await paid_order(ledger, razorpay, user)
        good = razorpay.checkout_signature(ours["razorpay_order_id"], payment["id"])
        bad = ("0" if good[0] != "0" else "1") + good[1:]
        r = await verify(ledger, user, ours["razorpay_order_id"], payment["id"], bad)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_signature"
        body, headers = razorpay.webhook("payment.captured", payment=payment)
        r = await deliver(ledger, (body, {**headers, "X-Razorpay-Signature": bad}))
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_signature"
        r = await deliver(
            ledger, (body, {k: v for k, v in headers.items() if "Signature" not in k})
        )
        assert r.status_code == 400
        assert await grants(ledger, user) == [] and await payments(ledger, user) == []

    async def test_another_users_order_is_refused(self, ledger, razorpay, buyer):
        alice, mallory = await buyer(), await buyer()
        ours, payment = await paid_order(ledger, razorpay, alice)
        signature = razorpay.checkout_signature(ours["razorpay_order_id"], payment["id"])
        # Mallory replays Alice's checkout: the order is not hers.
        r = await verify(ledger, mallory, ours["razorpay_order_id"], payment["id"], signature)
        assert r.status_code == 403, r.text
        # Mallory's own order with Alice's payment: the signature is for Alice's order.
        own = await order(ledger, mallory)
        r = await verify(ledger, mallory, own["razorpay_order_id"], payment["id"], signature)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_signature"
        # An order id nobody created.
        r = await verify(ledger, mallory, "order_DoesNotExist01", payment["id"], signature)
        assert r.status_code == 400
        assert await grants(ledger, mallory) == [] and await grants(ledger, alice) == []

    async def test_reserialised_webhook_body_is_400(self, ledger, razorpay, buyer):
        user = await buyer()
        _, payment = await paid_order(ledger, razorpay, user)
        body, headers = razorpay.webhook("payment.captured", payment=payment)
        # Same JSON, different bytes: the signature covers the bytes.
        for changed in (
            json.dumps(json.loads(body)).encode(),
            body + b"\n",
            body.replace(b"{", b"{ ", 1),
        ):
            assert changed != body
            r = await ledger.post(WEBHOOK, content=changed, headers=headers)
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_signature"
        assert await grants(ledger, user) == []
        # The original bytes, still signed, are accepted.
        assert (await deliver(ledger, (body, headers))).status_code == 200
        assert len(await grants(ledger, user)) == 1

    async def test_amount_mismatch_grants_nothing_and_raises_an_alert(
        self, ledger, razorpay, buyer
    ):
        user = await buyer()
        ours = await order(ledger, user, "topup_50")
        payment = razorpay.pay(ours["razorpay_order_id"], amount=499)
        r = await deliver(ledger, razorpay.webhook("payment.captured", payment=payment))
        assert r.status_code == 200 and r.json()["outcome"] == "rejected", r.text
        signature = razorpay.checkout_signature(ours["razorpay_order_id"], payment["id"])
        r = await verify(ledger, user, ours["razorpay_order_id"], payment["id"], signature)
        assert r.status_code == 409 and r.json()["error"]["code"] == "payment_rejected", r.text
        other = razorpay.pay(ours["razorpay_order_id"], currency="INR")
        await deliver(ledger, razorpay.webhook("payment.captured", payment=other))
        assert await grants(ledger, user) == []
        assert (await balance(ledger, user))["available"] == 0
        r = await ledger.get("/v1/billing/alerts", headers=admin())
        mine = [a for a in r.json()["items"] if a["user_id"] == user]
        assert {a["payment_id"] for a in mine} == {payment["id"], other["id"]}
        by_payment = {a["payment_id"]: a for a in mine}
        assert by_payment[payment["id"]]["kind"] == "amount_mismatch"
        assert by_payment[payment["id"]]["detail"]["paid_amount"] == 499
        assert by_payment[other["id"]]["detail"]["paid_currency"] == "INR"
        assert {p["status"] for p in await payments(ledger, user)} == {"rejected"}
        r = await ledger.get("/v1/billing/alerts", headers=as_user(user))
        assert r.status_code == 403


class TestFailures:
    async def test_payment_failed_after_captured_keeps_it_paid(self, ledger, razorpay, buyer):
        user = await buyer()
        _, payment = await paid_order(ledger, razorpay, user, "topup_10")
        await deliver(ledger, razorpay.webhook("payment.captured", payment=payment))
        failed = {**payment, "status": "failed", "captured": False}
        r = await deliver(ledger, razorpay.webhook("payment.failed", payment=failed))
        assert r.status_code == 200
        assert (await balance(ledger, user))["available"] == 10
        r = await ledger.get("/v1/ledger/transactions", params={"user_id": user}, headers=admin())
        assert [t["kind"] for t in r.json()["items"]] == ["grant"]
        (row,) = await payments(ledger, user)
        assert row["status"] == "captured" and row["granted"] == 10

    async def test_failed_then_a_captured_retry_is_granted(self, ledger, razorpay, buyer):
        user = await buyer()
        ours = await order(ledger, user, "topup_10")
        failed = razorpay.pay(ours["razorpay_order_id"], status="failed")
        await deliver(ledger, razorpay.webhook("payment.failed", payment=failed))
        ok = razorpay.pay(ours["razorpay_order_id"])
        await deliver(ledger, razorpay.webhook("payment.captured", payment=ok))
        rows = {p["payment_id"]: p for p in await payments(ledger, user)}
        assert rows[failed["id"]]["status"] == "failed" and rows[failed["id"]]["granted"] == 0
        assert rows[ok["id"]]["granted"] == 10
        assert (await balance(ledger, user))["available"] == 10

    async def test_razorpay_down_is_502_and_nothing_is_written(self, ledger, razorpay, buyer):
        user = await buyer()
        razorpay.down = True
        try:
            r = await ledger.post(
                "/v1/billing/orders",
                json={"user_id": user, "item": "topup_10"},
                headers=as_user(user),
            )
        finally:
            razorpay.down = False
        assert r.status_code == 502 and r.json()["error"]["code"] == "razorpay_unavailable"


class TestPlanAsOrder:
    async def test_a_plan_bought_once_grants_one_period(self, ledger, razorpay, buyer):
        user = await buyer()
        ours, payment = await paid_order(ledger, razorpay, user, "pro_monthly")
        assert ours["amount"] == 5000 and ours["credits"] == 1500
        r = await deliver(ledger, razorpay.webhook("payment.captured", payment=payment))
        assert r.json()["outcome"] == "granted"
        (row,) = await payments(ledger, user)
        assert row["granted"] == 1500 and row["expires_at"] is not None
        days = (
            datetime.fromisoformat(row["expires_at"]) - datetime.fromisoformat(row["period_start"])
        ).days
        assert 28 <= days <= 31
        b = await balance(ledger, user)
        assert b["available"] == 1500 and b["by_source"] == [
            {"source": "subscription", "available": 1500}
        ]
