"""Billing's edges refuse bad text with a 4xx JSON, never a 500."""

from __future__ import annotations

import json

from tests.ledger.billing.helpers import WEBHOOK, as_user, deliver, grants, order, paid_order


class TestSignatures:
    async def test_a_non_ascii_or_non_hex_webhook_signature_is_a_400(self, ledger, razorpay, buyer):
        user = await buyer()
        _, payment = await paid_order(ledger, razorpay, user, "topup_10")
        body, headers = razorpay.webhook("payment.captured", payment=payment)
        for bad in ("é" * 64, "zz" * 32, "\u00ff", " ", "0" * 4096):
            raw = [
                (k.encode(), v.encode()) for k, v in headers.items() if k != "X-Razorpay-Signature"
            ]
            raw.append((b"x-razorpay-signature", bad.encode("latin-1")))
            r = await ledger.post(WEBHOOK, content=body, headers=raw)
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error"]["code"] == "invalid_signature"
        assert await grants(ledger, user) == []
        r = await deliver(ledger, (body, headers))  # the genuine one still works
        assert r.status_code == 200 and r.json()["outcome"] == "granted"

    async def test_a_non_ascii_checkout_signature_is_a_400(self, ledger, razorpay, buyer):
        user = await buyer()
        ours = await order(ledger, user)
        payment = razorpay.pay(ours["razorpay_order_id"])
        r = await ledger.post(
            "/v1/billing/verify",
            json={
                "razorpay_order_id": ours["razorpay_order_id"],
                "razorpay_payment_id": payment["id"],
                "razorpay_signature": "é" * 64,
            },
            headers=as_user(user),
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_signature"


class TestText:
    async def test_nul_and_lone_surrogates_are_422(self, ledger, razorpay, buyer):
        user = await buyer()
        for item in ("topup\u0000", "\ud800"):
            r = await ledger.post(
                "/v1/billing/orders",
                content=json.dumps({"user_id": user, "item": item}).encode(),
                headers={**as_user(user), "content-type": "application/json"},
            )
            assert r.status_code == 422, r.text
            assert r.json()["error"]["code"] == "invalid_text"
        r = await ledger.get("/v1/billing/payments", params={"user_id": f"{user}\x00"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_text"
