"""Razorpay over its official (synchronous) client, run in a worker thread.

`KU_RAZORPAY_BASE_URL` points the client at the real API or, in tests, at a local
fake speaking the same REST wire format. Client errors become Ku errors:
Razorpay refusing a request is a 502 (`razorpay_rejected`), an unreachable or
failing Razorpay a 502 (`razorpay_unavailable`), so callers never see `requests`.
Signatures are checked here too, always in constant time over exact bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Callable
from typing import Any

import razorpay
import requests
from razorpay.errors import BadRequestError, GatewayError, ServerError

from services.kit.errors import ServiceUnavailable, UpstreamError
from services.ledger.config import LedgerSettings

log = logging.getLogger("ku.ledger.billing.razorpay")

PAGE = 100  # Razorpay's largest page


def hmac_hex(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_ok(secret: str, message: bytes, signature: str | None) -> bool:
    """HMAC-SHA256(message, secret) in hex equals `signature` (constant time)."""
    if not secret or not signature:
        return False
    # Bytes, not str: compare_digest raises TypeError on a non-ASCII str, and a header
    # arrives as whatever latin-1 text the sender chose. Non-ASCII never matches hex.
    given = signature.strip().encode("utf-8", "surrogatepass")
    return hmac.compare_digest(hmac_hex(secret, message).encode(), given)


class RazorpayAPI:
    def __init__(self, settings: LedgerSettings) -> None:
        self.key_id = settings.razorpay_key_id
        self._secret = settings.razorpay_key_secret
        self.base_url = settings.razorpay_base_url.rstrip("/")
        self.timeout = settings.razorpay_timeout_seconds

    def require_configured(self) -> None:
        if not self.key_id or not self._secret:
            raise ServiceUnavailable(
                "Payments are not configured (KU_RAZORPAY_KEY_ID / KU_RAZORPAY_KEY_SECRET)",
                code="billing_not_configured",
            )

    def checkout_signature_ok(
        self, razorpay_order_id: str, payment_id: str, signature: str
    ) -> bool:
        """Checkout's `razorpay_signature` = HMAC-SHA256(order_id|payment_id, key secret)."""
        return signature_ok(self._secret, f"{razorpay_order_id}|{payment_id}".encode(), signature)

    def _client(self) -> razorpay.Client:
        # One client per call: requests.Session is not meant to be shared across threads.
        client = razorpay.Client(auth=(self.key_id, self._secret), base_url=self.base_url)
        client.set_app_details({"title": "Ku", "version": "1"})
        return client

    async def _call(self, what: str, fn: Callable[[razorpay.Client], Any]) -> Any:
        self.require_configured()

        def run() -> Any:
            return fn(self._client())

        try:
            return await asyncio.to_thread(run)
        except BadRequestError as exc:
            # Razorpay's own text goes to the log, not to our caller.
            log.warning("razorpay refused to %s: %s", what, exc)
            raise UpstreamError(f"Razorpay refused to {what}", code="razorpay_rejected") from None
        except (GatewayError, ServerError, requests.RequestException, ValueError) as exc:
            log.warning("razorpay %s failed: %s", what, exc)
            raise UpstreamError(
                f"Razorpay is unavailable ({what})", code="razorpay_unavailable"
            ) from None

    async def create_order(
        self, *, amount: int, currency: str, receipt: str, notes: dict[str, str]
    ) -> dict[str, Any]:
        data = {
            "amount": amount,
            "currency": currency,
            "receipt": receipt,
            "notes": notes,
            "payment_capture": 1,
        }
        return await self._call(
            "create an order", lambda c: c.order.create(data, timeout=self.timeout)
        )

    async def fetch_payment(self, payment_id: str) -> dict[str, Any]:
        return await self._call(
            "fetch a payment", lambda c: c.payment.fetch(payment_id, timeout=self.timeout)
        )

    async def order_payments(self, razorpay_order_id: str) -> list[dict[str, Any]]:
        page = await self._call(
            "list an order's payments",
            lambda c: c.order.payments(razorpay_order_id, timeout=self.timeout),
        )
        return list(page.get("items") or [])

    async def payments_between(self, start: int, end: int) -> list[dict[str, Any]]:
        """Every payment created in [start, end] (unix seconds), all pages."""
        items: list[dict[str, Any]] = []

        def page_from(skip: int) -> Callable[[razorpay.Client], Any]:
            query = {"from": start, "to": end, "count": PAGE, "skip": skip}
            return lambda c: c.payment.all(query, timeout=self.timeout)

        while True:
            page = await self._call("list payments", page_from(len(items)))
            batch = list(page.get("items") or [])
            items.extend(batch)
            if len(batch) < PAGE:
                return items

    async def payment_refunds(self, payment_id: str) -> list[dict[str, Any]]:
        page = await self._call(
            "list a payment's refunds",
            lambda c: c.payment.fetch_multiple_refund(
                payment_id, {"count": PAGE}, timeout=self.timeout
            ),
        )
        return list(page.get("items") or [])

    async def fetch_invoice(self, invoice_id: str) -> dict[str, Any]:
        return await self._call(
            "fetch an invoice", lambda c: c.invoice.fetch(invoice_id, timeout=self.timeout)
        )

    async def create_plan(
        self, *, period: str, name: str, amount: int, currency: str, notes: dict[str, str]
    ) -> dict[str, Any]:
        data = {
            "period": {"month": "monthly", "year": "yearly"}[period],
            "interval": 1,
            "item": {"name": name, "amount": amount, "currency": currency},
            "notes": notes,
        }
        return await self._call(
            "create a plan", lambda c: c.plan.create(data, timeout=self.timeout)
        )

    async def create_subscription(
        self, *, plan_id: str, total_count: int, notes: dict[str, str]
    ) -> dict[str, Any]:
        data = {
            "plan_id": plan_id,
            "total_count": total_count,
            "quantity": 1,
            "customer_notify": 1,
            "notes": notes,
        }
        return await self._call(
            "create a subscription", lambda c: c.subscription.create(data, timeout=self.timeout)
        )

    async def cancel_subscription(self, subscription_id: str) -> dict[str, Any]:
        return await self._call(
            "cancel a subscription",
            lambda c: c.subscription.cancel(
                subscription_id, {"cancel_at_cycle_end": 0}, timeout=self.timeout
            ),
        )
