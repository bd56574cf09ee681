"""Request helpers for billing tests."""

from __future__ import annotations

from typing import Any

import httpx

from services.kit.testing.plugin import principal_headers
from tests.ledger.billing.fake_razorpay import FakeRazorpay
from tests.ledger.helpers import admin

WEBHOOK = "/v1/billing/webhooks/razorpay"


def as_user(user_id: str) -> dict[str, str]:
    return principal_headers(
        "user", app="penora", user_id=user_id, scopes=("ledger:read", "ledger:write")
    )


async def order(ledger: httpx.AsyncClient, user_id: str, item: str = "topup_25") -> dict[str, Any]:
    r = await ledger.post(
        "/v1/billing/orders", json={"user_id": user_id, "item": item}, headers=as_user(user_id)
    )
    assert r.status_code == 201, r.text
    return r.json()


async def verify(
    ledger: httpx.AsyncClient,
    user_id: str,
    razorpay_order_id: str,
    payment_id: str,
    signature: str,
) -> httpx.Response:
    return await ledger.post(
        "/v1/billing/verify",
        json={
            "razorpay_order_id": razorpay_order_id,
            "razorpay_payment_id": payment_id,
            "razorpay_signature": signature,
        },
        headers=as_user(user_id),
    )


async def deliver(
    ledger: httpx.AsyncClient, delivery: tuple[bytes, dict[str, str]]
) -> httpx.Response:
    """POST a webhook exactly as Razorpay would (no principal header)."""
    body, headers = delivery
    return await ledger.post(WEBHOOK, content=body, headers=headers)


async def paid_order(
    ledger: httpx.AsyncClient, razorpay: FakeRazorpay, user_id: str, item: str = "topup_25"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """An order of ours, paid at Razorpay (nobody told us yet)."""
    ours = await order(ledger, user_id, item)
    return ours, razorpay.pay(ours["razorpay_order_id"])


async def grants(ledger: httpx.AsyncClient, user_id: str) -> list[dict[str, Any]]:
    r = await ledger.get(
        "/v1/ledger/transactions", params={"user_id": user_id, "kind": "grant"}, headers=admin()
    )
    assert r.status_code == 200, r.text
    return r.json()["items"]


async def payments(ledger: httpx.AsyncClient, user_id: str) -> list[dict[str, Any]]:
    r = await ledger.get(
        "/v1/billing/payments", params={"user_id": user_id}, headers=as_user(user_id)
    )
    assert r.status_code == 200, r.text
    return r.json()["items"]
