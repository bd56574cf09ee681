"""Reconciliation: a payment nobody reported is found at Razorpay and granted once."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from services.ledger.billing.tasks import reconcile
from tests.ledger.billing.helpers import deliver, grants, paid_order, payments
from tests.ledger.helpers import balance


class TestReconcile:
    async def test_missed_webhook_is_granted_once_and_the_late_webhook_is_a_no_op(
        self, ledger, razorpay, buyer
    ):
        user = await buyer()
        _, payment = await paid_order(ledger, razorpay, user, "topup_25")
        assert await grants(ledger, user) == []  # neither checkout nor webhook reached us
        first = await reconcile()
        assert first["granted"] >= 1 and not first.get("errors"), first
        second = await reconcile()
        assert second.get("granted", 0) == 0 and not second.get("errors"), second
        assert len(await grants(ledger, user)) == 1
        r = await deliver(ledger, razorpay.webhook("payment.captured", payment=payment))
        assert r.status_code == 200 and r.json()["outcome"] == "already_granted"
        assert len(await grants(ledger, user)) == 1
        assert (await balance(ledger, user))["available"] == 25
        (row,) = await payments(ledger, user)
        assert row["status"] == "captured" and row["granted"] == 25

    async def test_reconcile_races_the_webhook(self, ledger, razorpay, buyer):
        user = await buyer()
        _, payment = await paid_order(ledger, razorpay, user, "topup_10")
        delivery = razorpay.webhook("payment.captured", payment=payment)
        await asyncio.gather(reconcile(), deliver(ledger, delivery), reconcile())
        assert len(await grants(ledger, user)) == 1
        assert (await balance(ledger, user))["available"] == 10

    async def test_razorpay_down_changes_nothing(self, ledger, razorpay, buyer):
        user = await buyer()
        await paid_order(ledger, razorpay, user, "topup_10")
        razorpay.down = True
        try:
            try:
                await reconcile()
            except Exception as exc:  # the job fails loudly; the next run retries
                assert "unavailable" in str(exc).lower()
        finally:
            razorpay.down = False
        assert await grants(ledger, user) == []
        await reconcile()
        assert len(await grants(ledger, user)) == 1

    async def test_cli(self, ledger, razorpay, buyer):
        user = await buyer()
        await paid_order(ledger, razorpay, user, "topup_50")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.cli",
            "billing",
            "reconcile",
            "--hours",
            "1",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=os.environ.copy(),
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        counts = json.loads(out.decode().strip().splitlines()[-1])
        assert counts["granted"] >= 1
        assert (await balance(ledger, user))["available"] == 50

    async def test_refund_nobody_reported_is_clawed_back(
        self, ledger, razorpay, buyer, ku_database_url
    ):
        from services.kit.db import plain_url
        from services.ledger.verify import verify

        user = await buyer()
        _, payment = await paid_order(ledger, razorpay, user, "topup_50")
        refund = razorpay.refund(payment["id"], 200)  # 20 of the 50 Ku
        counts = await reconcile()
        assert counts.get("refund_clawed_back", 0) >= 1, counts
        assert (await balance(ledger, user))["available"] == 30
        (row,) = await payments(ledger, user)
        assert row["status"] == "partially_refunded" and row["clawed_back"] == 20
        again = await reconcile()
        assert not again.get("refund_clawed_back") and not again.get("errors"), again
        late = razorpay.webhook(
            "refund.processed", refund=refund, payment=razorpay.payments[payment["id"]]
        )
        assert (await deliver(ledger, late)).json()["outcome"] == "duplicate_refund"
        assert (await balance(ledger, user))["available"] == 30
        assert await verify(plain_url(ku_database_url)) == []
