"""Subscription tiers follow billing: a paid plan gives its tier's monthly enhancements,
a cancellation or the end of the paid period returns the user to Free.

In-process ledger (billing inside it, its outbox relay publishing to the real Redis) and
enhancement service (its consumer reading the ledger's stream), with Razorpay as the
fake on 127.0.0.1 speaking Razorpay's REST and signed webhooks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from services.enhancement.service import Enhancer
from services.kit.service_client import ServiceClient
from services.kit.testing.plugin import asgi_client, principal_headers
from tests.ledger.billing.fake_razorpay import FakeRazorpay, configured_razorpay
from tests.ledger.billing.helpers import as_user, deliver, paid_order, verify

DAY = 86_400


class Billing:
    def __init__(self, ledger: httpx.AsyncClient, razorpay: FakeRazorpay) -> None:
        self.ledger = ledger
        self.razorpay = razorpay

    async def new_user(self, user_id: str) -> str:
        operator = principal_headers(
            "app", app="penora", scopes=("users:any", "users:write"), audience="ledger"
        )
        r = await self.ledger.post(
            "/v1/ledger/accounts", json={"user_id": user_id, "welcome": False}, headers=operator
        )
        assert r.status_code == 201, r.text
        return user_id

    async def subscribe(self, user_id: str, item: str) -> str:
        r = await self.ledger.post(
            "/v1/billing/subscriptions",
            json={"user_id": user_id, "item": item},
            headers=as_user(user_id),
        )
        assert r.status_code == 201, r.text
        return str(r.json()["razorpay_subscription_id"])

    async def charge(self, rzp: str, start: int, end: int) -> None:
        payment, state = self.razorpay.charge_subscription(rzp, start, end)
        r = await deliver(
            self.ledger,
            self.razorpay.webhook("subscription.charged", subscription=state, payment=payment),
        )
        assert r.json()["outcome"] == "granted", r.text

    async def cancel(self, rzp: str) -> None:
        self.razorpay.subscriptions[rzp]["status"] = "cancelled"
        r = await deliver(
            self.ledger,
            self.razorpay.webhook(
                "subscription.cancelled", subscription=self.razorpay.subscriptions[rzp]
            ),
        )
        assert r.json()["outcome"] == "cancelled", r.text


@pytest.fixture(scope="module")
async def billing(ku_database_url: str) -> AsyncIterator[Billing]:
    from services.ledger.app import create_app

    async with asgi_client(create_app()) as ledger, configured_razorpay() as razorpay:
        yield Billing(ledger, razorpay)


@pytest.fixture(scope="module")
async def enhancement(
    billing: Billing,
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    from services.enhancement.app import create_app

    app = create_app()
    async with asgi_client(app) as client:
        # Its ledger calls (the month's allowance) go to the in-process ledger.
        ledger = billing.ledger._transport.app  # type: ignore[attr-defined]
        enhancer: Enhancer = app.state.enhancer
        await enhancer.client.aclose()
        enhancer.client = ServiceClient(
            enhancer.settings, me="enhancement", transport=httpx.ASGITransport(app=ledger)
        )
        yield app, client


async def allowance(client: httpx.AsyncClient, user_id: str) -> dict[str, Any]:
    headers = principal_headers("user", app="imagegene", user_id=user_id, scopes=("enhance",))
    r = await client.get("/v1/enhancement/allowance", headers=headers)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def until_tier(
    client: httpx.AsyncClient, user_id: str, tier: str, within: float = 20
) -> dict[str, Any]:
    """The events travel outbox → Redis → consumer: wait for them to arrive."""
    deadline = time.monotonic() + within
    while True:
        seen = await allowance(client, user_id)
        if seen["tier"] == tier:
            return seen
        assert time.monotonic() < deadline, f"tier still {seen['tier']}, expected {tier}"
        await asyncio.sleep(0.1)


class TestTiersFromBilling:
    async def test_plus_gives_10_and_cancelling_returns_to_free(
        self, billing: Billing, enhancement, new_user_id
    ):
        _, client = enhancement
        user = await billing.new_user(new_user_id())
        assert (await allowance(client, user))["included"] == 0  # Free
        rzp = await billing.subscribe(user, "lite_monthly")  # Lite: ImageGene's Plus
        now = int(time.time())
        await billing.charge(rzp, now - 60, now + 30 * DAY)
        plus = await until_tier(client, user, "plus")
        assert (plus["included"], plus["used"], plus["remaining"]) == (10, 0, 10)
        await billing.cancel(rzp)
        free = await until_tier(client, user, "free")
        assert (free["included"], free["remaining"]) == (0, 0)

    async def test_the_tier_ends_with_the_paid_period(
        self, billing: Billing, enhancement, new_user_id
    ):
        app, client = enhancement
        enhancer: Enhancer = app.state.enhancer
        user = await billing.new_user(new_user_id())
        rzp = await billing.subscribe(user, "pro_monthly")
        now = int(time.time())
        await billing.charge(rzp, now - 60, now + 30 * DAY)
        assert (await until_tier(client, user, "pro"))["included"] == 25
        end = datetime.fromtimestamp(now + 30 * DAY, UTC)
        # No renewal was charged: the day after the period, the user is Free again.
        later = await enhancer.allowance(user, now=end + timedelta(seconds=1))
        assert (later["tier"], later["included"]) == ("free", 0)
        # A renewal extends it.
        await billing.charge(rzp, now + 30 * DAY, now + 61 * DAY)
        deadline = time.monotonic() + 20
        while (await enhancer.allowance(user, now=end + timedelta(seconds=1)))["tier"] != "pro":
            assert time.monotonic() < deadline, "the renewal never arrived"
            await asyncio.sleep(0.1)

    async def test_a_plan_bought_as_one_order_gives_its_tier_for_its_period(
        self, billing: Billing, enhancement, new_user_id
    ):
        app, client = enhancement
        user = await billing.new_user(new_user_id())
        ours, payment = await paid_order(billing.ledger, billing.razorpay, user, "lite_yearly")
        signature = billing.razorpay.checkout_signature(ours["razorpay_order_id"], payment["id"])
        r = await verify(billing.ledger, user, ours["razorpay_order_id"], payment["id"], signature)
        assert r.json()["outcome"] == "granted", r.text
        assert (await until_tier(client, user, "plus"))["included"] == 10
        after_a_year = datetime.now(UTC) + timedelta(days=367)
        assert (await app.state.enhancer.allowance(user, now=after_a_year))["tier"] == "free"


class TestSubscriptionEvents:
    """The handler, fed directly: events may come twice and out of order."""

    async def test_cancelled_is_final_and_periods_only_extend(self, ledger_enhancer: Enhancer):
        enhancer = ledger_enhancer
        user = f"u{time.time_ns()}"
        end = datetime.now(UTC) + timedelta(days=30)

        def event(sub: str, status: str, expires_at: datetime | None) -> dict[str, Any]:
            return {
                "subscription_id": sub,
                "user_id": user,
                "item": "lite_monthly",
                "status": status,
                "expires_at": expires_at.isoformat() if expires_at else None,
            }

        await enhancer.subscription_changed(event("s1", "active", end))
        await enhancer.subscription_changed(event("s1", "active", end - timedelta(days=30)))
        assert (await enhancer.allowance(user, now=end - timedelta(days=1)))["tier"] == "plus"
        await enhancer.subscription_changed(event("s2", "cancelled", None))
        await enhancer.subscription_changed(event("s2", "active", end))  # late: stays cancelled
        await enhancer.subscription_changed(event("s1", "cancelled", None))
        await enhancer.subscription_changed(event("s1", "cancelled", None))
        assert (await enhancer.allowance(user))["tier"] == "free"

    async def test_an_admin_tier_is_a_floor_and_unmapped_plans_give_none(
        self, ledger_enhancer: Enhancer
    ):
        enhancer = ledger_enhancer
        user = f"u{time.time_ns()}"
        end = datetime.now(UTC) + timedelta(days=30)
        await enhancer.set_tier(user, "plus")
        await enhancer.subscription_changed(
            {
                "subscription_id": f"{user}-x",
                "user_id": user,
                "item": "some_other_plan",
                "status": "active",
                "expires_at": end.isoformat(),
            }
        )
        assert (await enhancer.allowance(user))["tier"] == "plus"
        await enhancer.subscription_changed(
            {
                "subscription_id": f"{user}-pro",
                "user_id": user,
                "item": "pro_yearly",
                "status": "active",
                "expires_at": end.isoformat(),
            }
        )
        assert (await enhancer.allowance(user))["included"] == 25
