"""Subscriptions: each charged period grants its allowance, expiring at the period's
end; after a cancellation, renewals grant nothing."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from services.ledger.billing.tasks import reconcile
from tests.ledger.billing.helpers import as_user, deliver, grants, payments
from tests.ledger.helpers import admin, balance

DAY = 86_400


async def subscribe(ledger, user_id: str, item: str = "lite_monthly") -> dict:
    r = await ledger.post(
        "/v1/billing/subscriptions",
        json={"user_id": user_id, "item": item},
        headers=as_user(user_id),
    )
    assert r.status_code == 201, r.text
    return r.json()


def iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


class TestSubscriptions:
    async def test_two_periods_two_grants_the_first_expires_at_its_end(
        self, ledger, razorpay, buyer
    ):
        user = await buyer()
        sub = await subscribe(ledger, user)
        assert sub["credits"] == 500 and sub["amount"] == 2000 and sub["period"] == "month"
        rzp = sub["razorpay_subscription_id"]
        now = int(time.time())
        first_end = now + 3
        periods = [(first_end - 30 * DAY, first_end), (first_end, first_end + 31 * DAY)]
        for start, end in periods:
            payment, state = razorpay.charge_subscription(rzp, start, end)
            delivery = razorpay.webhook("subscription.charged", subscription=state, payment=payment)
            r = await deliver(ledger, delivery)
            assert r.json()["outcome"] == "granted", r.text
            await deliver(ledger, delivery)  # redelivery: nothing more
        assert len(await grants(ledger, user)) == 2
        b = await balance(ledger, user)
        assert b["available"] == 1000
        assert b["next_expiry"]["amount"] == 500
        assert b["next_expiry"]["at"].replace("+00:00", "Z") == iso(first_end)
        rows = sorted(await payments(ledger, user), key=lambda p: p["expires_at"])
        assert [p["granted"] for p in rows] == [500, 500]
        assert [p["period_end"].replace("+00:00", "Z") for p in rows] == [
            iso(end) for _, end in periods
        ]
        await asyncio.sleep(max(0.0, first_end - time.time()) + 0.3)
        assert (await balance(ledger, user))["available"] == 500

    async def test_cancellation_stops_renewals(self, ledger, razorpay, buyer):
        user = await buyer()
        rzp = (await subscribe(ledger, user, "pro_yearly"))["razorpay_subscription_id"]
        now = int(time.time())
        payment, state = razorpay.charge_subscription(rzp, now - 60, now + 365 * DAY)
        await deliver(
            ledger, razorpay.webhook("subscription.charged", subscription=state, payment=payment)
        )
        razorpay.subscriptions[rzp]["status"] = "cancelled"
        r = await deliver(
            ledger,
            razorpay.webhook("subscription.cancelled", subscription=razorpay.subscriptions[rzp]),
        )
        assert r.json()["outcome"] == "cancelled"
        late, state = razorpay.charge_subscription(rzp, now + 365 * DAY, now + 730 * DAY)
        r = await deliver(
            ledger, razorpay.webhook("subscription.charged", subscription=state, payment=late)
        )
        assert r.json()["outcome"] == "ignored"
        assert len(await grants(ledger, user)) == 1
        assert (await balance(ledger, user))["available"] == 9000
        statuses = {p["payment_id"]: p["status"] for p in await payments(ledger, user)}
        assert statuses == {payment["id"]: "captured", late["id"]: "ignored"}
        alerts = (await ledger.get("/v1/billing/alerts", headers=admin())).json()["items"]
        assert any(
            a["kind"] == "charged_after_cancellation" and a["payment_id"] == late["id"]
            for a in alerts
        )
        await reconcile()  # reconciliation finds the same charge and grants nothing either
        assert len(await grants(ledger, user)) == 1

    async def test_missed_charge_is_granted_by_reconcile_with_the_same_expiry(
        self, ledger, razorpay, buyer
    ):
        user = await buyer()
        rzp = (await subscribe(ledger, user, "studio_monthly"))["razorpay_subscription_id"]
        now = int(time.time())
        payment, state = razorpay.charge_subscription(rzp, now - 60, now + 30 * DAY)
        counts = await reconcile()
        assert not counts.get("errors"), counts
        (row,) = await payments(ledger, user)
        assert row["granted"] == 5000 and row["expires_at"].replace("+00:00", "Z") == iso(
            now + 30 * DAY
        )
        r = await deliver(
            ledger, razorpay.webhook("subscription.charged", subscription=state, payment=payment)
        )
        assert r.json()["outcome"] == "already_granted"
        assert len(await grants(ledger, user)) == 1

    async def test_only_plans_can_be_subscribed(self, ledger, razorpay, buyer):
        user = await buyer()
        r = await ledger.post(
            "/v1/billing/subscriptions",
            json={"user_id": user, "item": "topup_10"},
            headers=as_user(user),
        )
        assert r.status_code == 422 and r.json()["error"]["code"] == "not_a_plan"
