"""The month's revenue from billing's payments, and the enhancement pool budget made of it.

Payments are made the way Razorpay makes them (fake Razorpay on 127.0.0.1: checkout
verification, webhooks, a refund, a mismatched amount); the enhancement service asks
billing over HTTP as itself (its own signed service principal) and reports 80 % of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from services.enhancement.config import EnhancementSettings
from services.enhancement.service import Enhancer
from services.kit.bus import redis_from_url
from services.kit.db import create_engine, sessionmaker_for
from services.kit.runner import free_port
from services.kit.service_client import ServiceClient
from services.kit.testing.plugin import principal_headers
from tests.ledger.billing.helpers import as_user, deliver, paid_order, verify
from tests.ledger.helpers import admin

REVENUE = "/v1/billing/revenue"


def as_service(name: str) -> dict[str, str]:
    return principal_headers("service", app=name, scopes=(), audience="ledger")


async def revenue(ledger: httpx.AsyncClient, month: str | None = None) -> dict[str, Any]:
    params = {"month": month} if month else {}
    r = await ledger.get(REVENUE, params=params, headers=as_service("enhancement"))
    assert r.status_code == 200, r.text
    return dict(r.json())


def usd(body: dict[str, Any]) -> dict[str, int]:
    for item in body["items"]:
        if item["currency"] == "USD":
            return dict(item)
    return {"payments": 0, "captured": 0, "refunded": 0, "net": 0}


async def make_payments(ledger: httpx.AsyncClient, razorpay: Any, user: str) -> None:
    """300 verified at checkout; 500 by webhook, 200 of it refunded; 499 for a 100
    order (rejected: owed back, not revenue). Net: 600 USD cents in 2 payments."""
    ours, payment = await paid_order(ledger, razorpay, user, "topup_25")
    signature = razorpay.checkout_signature(ours["razorpay_order_id"], payment["id"])
    r = await verify(ledger, user, ours["razorpay_order_id"], payment["id"], signature)
    assert r.status_code == 200 and r.json()["outcome"] == "granted", r.text

    _, payment = await paid_order(ledger, razorpay, user, "topup_50")
    r = await deliver(ledger, razorpay.webhook("payment.captured", payment=payment))
    assert r.json()["outcome"] == "granted", r.text
    refund = razorpay.refund(payment["id"], 200)
    r = await deliver(
        ledger,
        razorpay.webhook(
            "refund.processed", refund=refund, payment=razorpay.payments[payment["id"]]
        ),
    )
    assert r.json()["outcome"] == "clawed_back", r.text

    ours = (
        await ledger.post(
            "/v1/billing/orders", json={"user_id": user, "item": "topup_10"}, headers=as_user(user)
        )
    ).json()
    wrong = razorpay.pay(ours["razorpay_order_id"], amount=499)
    r = await deliver(ledger, razorpay.webhook("payment.captured", payment=wrong))
    assert r.json()["outcome"] == "rejected", r.text


class TestRevenue:
    async def test_the_month_s_payments_net_of_refunds(self, ledger, razorpay, buyer):
        month = f"{datetime.now(UTC):%Y-%m}"
        before = usd(await revenue(ledger, month))
        await make_payments(ledger, razorpay, await buyer())
        after = await revenue(ledger)  # default: this month
        assert after["month"] == month
        got = usd(after)
        delta = {k: got[k] - before[k] for k in ("payments", "captured", "refunded", "net")}
        assert delta == {"payments": 2, "captured": 800, "refunded": 200, "net": 600}
        assert usd(await revenue(ledger, "2001-01")) == {
            "payments": 0,
            "captured": 0,
            "refunded": 0,
            "net": 0,
        }

    @pytest.mark.parametrize("month", ["2026-13", "2026-1", "last", "2026-00"])
    async def test_a_bad_month_is_422(self, ledger, month):
        r = await ledger.get(REVENUE, params={"month": month}, headers=admin())
        assert r.status_code == 422 and "code" in r.json()["error"]

    async def test_only_admins_and_the_enhancement_service(self, ledger, buyer):
        user = await buyer()
        allowed = [admin(), as_service("enhancement")]
        refused = [
            as_service("generation"),
            as_user(user),
            principal_headers(
                "app", app="penora", scopes=("ledger:read", "users:any"), audience="ledger"
            ),
        ]
        for headers in allowed:
            assert (await ledger.get(REVENUE, headers=headers)).status_code == 200
        for headers in refused:
            r = await ledger.get(REVENUE, headers=headers)
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
        assert (await ledger.get(REVENUE)).status_code == 401


@pytest.fixture
async def enhancer(ledger: httpx.AsyncClient, ku_database_url: str) -> AsyncIterator[Enhancer]:
    """The enhancement engine, its service client wired to this (in-process) ledger."""
    settings = EnhancementSettings(database_url=ku_database_url)
    engine = create_engine(settings)
    redis = redis_from_url(settings.redis_url)
    client = ServiceClient(settings, me="enhancement", transport=ledger._transport)
    e = Enhancer(settings, sessionmaker_for(engine), redis, client=client)
    yield e
    await e.aclose()
    await redis.aclose()
    await engine.dispose()


class TestEnhancementPoolBudget:
    async def test_credit_stats_report_80_percent_of_the_month_s_revenue(
        self, ledger, razorpay, buyer, enhancer: Enhancer
    ):
        before = (await enhancer.credit_stats())["budget"]
        await make_payments(ledger, razorpay, await buyer())
        budget = (await enhancer.credit_stats())["budget"]
        assert budget["available"] is True and budget["source"] == "billing"
        assert budget["month"] == f"{datetime.now(UTC):%Y-%m}"
        assert budget["pool_budget_percent"] == 80

        def usd_line(b: dict[str, Any]) -> dict[str, int]:
            lines = [x for x in b["revenue"] if x["currency"] == "USD"]
            return lines[0] if lines else {"revenue_minor": 0, "payments": 0}

        now, then = usd_line(budget), usd_line(before)
        assert now["revenue_minor"] - then["revenue_minor"] == 600
        assert now["payments"] - then["payments"] == 2
        assert now["pool_budget_minor"] == now["revenue_minor"] * 80 // 100

    async def test_billing_unreachable_leaves_the_rest_of_the_stats(
        self, ku_database_url: str, enhancer: Enhancer
    ):
        closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        settings = EnhancementSettings(database_url=ku_database_url, ledger_url=closed)
        await enhancer.client.aclose()
        enhancer.client = ServiceClient(settings, me="enhancement", retries=0)
        stats = await enhancer.credit_stats()
        assert stats["budget"]["available"] is False and stats["budget"]["revenue"] == []
        assert stats["budget"]["error"]["code"]
        assert "pools" in stats and "month" in stats
