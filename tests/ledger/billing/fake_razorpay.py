"""A local Razorpay: the REST endpoints the official client calls (basic auth, JSON,
Razorpay's error shape), plus what checkout, the bank and the dashboard do on
Razorpay's side (`pay`, `refund`, `charge_subscription`...) and webhooks signed
like Razorpay signs them (HMAC-SHA256 of the exact body with the webhook secret).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import string
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

ALPHABET = string.ascii_letters + string.digits


def rid(prefix: str) -> str:
    return f"{prefix}_" + "".join(secrets.choice(ALPHABET) for _ in range(14))


def hmac_hex(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _error(status: int, description: str, code: str = "BAD_REQUEST_ERROR") -> web.Response:
    return web.json_response(
        {"error": {"code": code, "description": description, "source": "NA", "step": "NA"}},
        status=status,
    )


class FakeRazorpay:
    def __init__(self, key_id: str, key_secret: str, webhook_secret: str) -> None:
        self.key_id = key_id
        self.key_secret = key_secret
        self.webhook_secret = webhook_secret
        self.orders: dict[str, dict[str, Any]] = {}
        self.payments: dict[str, dict[str, Any]] = {}
        self.plans: dict[str, dict[str, Any]] = {}
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.invoices: dict[str, dict[str, Any]] = {}
        self.refunds: dict[str, list[dict[str, Any]]] = {}
        self.calls: list[str] = []
        self.down = False
        self._runner: web.AppRunner | None = None
        self.url = ""

    # Server

    async def start(self) -> str:
        app = web.Application(middlewares=[self._auth])
        app.router.add_post("/v1/orders", self._create_order)
        app.router.add_get("/v1/orders/{id}", self._get(self.orders))
        app.router.add_get("/v1/orders/{id}/payments", self._order_payments)
        app.router.add_get("/v1/payments", self._list_payments)
        app.router.add_get("/v1/payments/{id}", self._get(self.payments))
        app.router.add_get("/v1/payments/{id}/refunds", self._payment_refunds)
        app.router.add_post("/v1/plans", self._create_plan)
        app.router.add_post("/v1/subscriptions", self._create_subscription)
        app.router.add_get("/v1/subscriptions/{id}", self._get(self.subscriptions))
        app.router.add_post("/v1/subscriptions/{id}/cancel", self._cancel_subscription)
        app.router.add_get("/v1/invoices/{id}", self._get(self.invoices))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.calls.append(f"{request.method} {request.path}")
        if self.down:
            return _error(503, "Service unavailable", "SERVER_ERROR")
        expected = base64.b64encode(f"{self.key_id}:{self.key_secret}".encode()).decode()
        if request.headers.get("Authorization") != f"Basic {expected}":
            return _error(401, "Authentication failed")
        return await handler(request)

    def _get(self, table: dict[str, dict[str, Any]]) -> Any:
        async def get(request: web.Request) -> web.Response:
            found = table.get(request.match_info["id"])
            if found is None:
                return _error(400, "The id provided does not exist")
            return web.json_response(found)

        return get

    async def _create_order(self, request: web.Request) -> web.Response:
        data = await request.json()
        amount = data.get("amount")
        if not isinstance(amount, int) or amount < 100:
            return _error(400, "Order amount less than minimum amount allowed")
        order = {
            "id": rid("order"),
            "entity": "order",
            "amount": amount,
            "amount_paid": 0,
            "amount_due": amount,
            "currency": data.get("currency", "INR"),
            "receipt": data.get("receipt"),
            "offer_id": None,
            "status": "created",
            "attempts": 0,
            "notes": data.get("notes") or [],
            "created_at": int(time.time()),
        }
        self.orders[order["id"]] = order
        return web.json_response(order)

    async def _order_payments(self, request: web.Request) -> web.Response:
        order_id = request.match_info["id"]
        if order_id not in self.orders:
            return _error(400, "The id provided does not exist")
        items = [p for p in self.payments.values() if p["order_id"] == order_id]
        return web.json_response({"entity": "collection", "count": len(items), "items": items})

    async def _list_payments(self, request: web.Request) -> web.Response:
        q = request.query
        start, end = int(q.get("from", 0)), int(q.get("to", 2**40))
        count, skip = min(int(q.get("count", 10)), 100), int(q.get("skip", 0))
        items = sorted(
            (p for p in self.payments.values() if start <= p["created_at"] <= end),
            key=lambda p: p["created_at"],
            reverse=True,
        )[skip : skip + count]
        return web.json_response({"entity": "collection", "count": len(items), "items": items})

    async def _payment_refunds(self, request: web.Request) -> web.Response:
        items = self.refunds.get(request.match_info["id"], [])
        return web.json_response({"entity": "collection", "count": len(items), "items": items})

    async def _create_plan(self, request: web.Request) -> web.Response:
        data = await request.json()
        plan = {
            "id": rid("plan"),
            "entity": "plan",
            "interval": data["interval"],
            "period": data["period"],
            "item": {**data["item"], "id": rid("item"), "active": True},
            "notes": data.get("notes") or [],
            "created_at": int(time.time()),
        }
        self.plans[plan["id"]] = plan
        return web.json_response(plan)

    async def _create_subscription(self, request: web.Request) -> web.Response:
        data = await request.json()
        if data.get("plan_id") not in self.plans:
            return _error(400, "The id provided does not exist")
        sub = {
            "id": rid("sub"),
            "entity": "subscription",
            "plan_id": data["plan_id"],
            "status": "created",
            "current_start": None,
            "current_end": None,
            "quantity": data.get("quantity", 1),
            "total_count": data["total_count"],
            "paid_count": 0,
            "remaining_count": data["total_count"],
            "notes": data.get("notes") or [],
            "created_at": int(time.time()),
        }
        self.subscriptions[sub["id"]] = sub
        return web.json_response(sub)

    async def _cancel_subscription(self, request: web.Request) -> web.Response:
        sub = self.subscriptions.get(request.match_info["id"])
        if sub is None:
            return _error(400, "The id provided does not exist")
        sub["status"] = "cancelled"
        return web.json_response(sub)

    # Razorpay's side: checkout, bank, dashboard

    def checkout_signature(self, order_id: str, payment_id: str) -> str:
        return hmac_hex(self.key_secret, f"{order_id}|{payment_id}".encode())

    def _payment(self, amount: int, currency: str, status: str, **extra: Any) -> dict[str, Any]:
        payment = {
            "id": rid("pay"),
            "entity": "payment",
            "amount": amount,
            "currency": currency,
            "status": status,
            "order_id": None,
            "invoice_id": None,
            "international": False,
            "method": "card",
            "amount_refunded": 0,
            "refund_status": None,
            "captured": status == "captured",
            "description": None,
            "email": "user@example.com",
            "contact": "+919000090000",
            "notes": [],
            "fee": 0,
            "tax": 0,
            "error_code": None if status != "failed" else "BAD_REQUEST_ERROR",
            "created_at": int(time.time()),
            **extra,
        }
        self.payments[payment["id"]] = payment
        return payment

    def pay(
        self,
        order_id: str,
        *,
        amount: int | None = None,
        currency: str | None = None,
        status: str = "captured",
    ) -> dict[str, Any]:
        """The user completes checkout for an order (default: the order's full amount)."""
        order = self.orders[order_id]
        payment = self._payment(
            order["amount"] if amount is None else amount,
            currency or order["currency"],
            status,
            order_id=order_id,
        )
        if status == "captured":
            order["amount_paid"] += payment["amount"]
            order["amount_due"] = max(0, order["amount"] - order["amount_paid"])
            order["status"] = "paid"
            order["attempts"] += 1
        return payment

    def refund(self, payment_id: str, amount: int | None = None) -> dict[str, Any]:
        payment = self.payments[payment_id]
        amount = payment["amount"] - payment["amount_refunded"] if amount is None else amount
        payment["amount_refunded"] += amount
        full = payment["amount_refunded"] >= payment["amount"]
        payment["status"] = "refunded" if full else payment["status"]
        payment["refund_status"] = "full" if full else "partial"
        refund = {
            "id": rid("rfnd"),
            "entity": "refund",
            "amount": amount,
            "currency": payment["currency"],
            "payment_id": payment_id,
            "status": "processed",
            "speed_processed": "normal",
            "notes": [],
            "created_at": int(time.time()),
        }
        self.refunds.setdefault(payment_id, []).append(refund)
        return refund

    def charge_subscription(
        self, subscription_id: str, start: int, end: int
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Razorpay charges one period: an invoice, a captured payment, the new period."""
        sub = self.subscriptions[subscription_id]
        plan = self.plans[sub["plan_id"]]
        invoice_id = rid("inv")
        payment = self._payment(
            plan["item"]["amount"],
            plan["item"]["currency"],
            "captured",
            order_id=rid("order"),
            invoice_id=invoice_id,
        )
        self.invoices[invoice_id] = {
            "id": invoice_id,
            "entity": "invoice",
            "subscription_id": subscription_id,
            "payment_id": payment["id"],
            "status": "paid",
            "amount": payment["amount"],
            "currency": payment["currency"],
            "billing_start": start,
            "billing_end": end,
            "created_at": int(time.time()),
        }
        if sub["status"] != "cancelled":
            sub["status"] = "active"
        sub.update(current_start=start, current_end=end, paid_count=sub["paid_count"] + 1)
        return payment, dict(sub)

    # Webhooks

    def webhook(self, event: str, **entities: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        """A delivery as Razorpay sends it: compact JSON, signed, with an event id."""
        body = json.dumps(
            {
                "entity": "event",
                "account_id": "acc_KuTest0000001",
                "event": event,
                "contains": list(entities),
                "payload": {k: {"entity": v} for k, v in entities.items()},
                "created_at": int(time.time()),
            },
            separators=(",", ":"),
        ).encode()
        headers = {
            "Content-Type": "application/json",
            "X-Razorpay-Signature": hmac_hex(self.webhook_secret, body),
            "X-Razorpay-Event-Id": rid("evt"),
        }
        return body, headers


SETTINGS = (
    "razorpay_key_id",
    "razorpay_key_secret",
    "razorpay_webhook_secret",
    "razorpay_base_url",
)


async def _forget_plans(database_url: str) -> None:
    """Plans live at one Razorpay account: another fake knows none of their ids."""
    import asyncpg

    from services.kit.db import plain_url

    conn = await asyncpg.connect(plain_url(database_url))
    try:
        await conn.execute("UPDATE ledger.billing_catalog SET razorpay_plan_id = NULL")
    finally:
        await conn.close()


@asynccontextmanager
async def configured_razorpay() -> AsyncIterator[FakeRazorpay]:
    """A running fake Razorpay (a fresh account: the catalog's Razorpay plan ids are
    forgotten on the way in and out), with the ledger's settings (and the environment,
    for the CLI) pointed at it; put back as they were afterwards."""
    from services.ledger.config import get_settings

    fake = FakeRazorpay(
        key_id="rzp_test_" + secrets.token_hex(6),
        key_secret=secrets.token_urlsafe(18),
        webhook_secret=secrets.token_urlsafe(18),
    )
    url = await fake.start()
    values = dict(
        zip(SETTINGS, (fake.key_id, fake.key_secret, fake.webhook_secret, url), strict=True)
    )
    settings = get_settings()
    await _forget_plans(settings.database_url)
    saved = {name: getattr(settings, name) for name in SETTINGS}
    for name, value in values.items():
        setattr(settings, name, value)
        os.environ[f"KU_{name.upper()}"] = value
    try:
        yield fake
    finally:
        for name, value in saved.items():
            setattr(settings, name, value)
            os.environ.pop(f"KU_{name.upper()}", None)
        await fake.stop()
        await _forget_plans(settings.database_url)
