"""Billing rules: what a payment is worth, when it grants, and what a refund takes back.

Exactly once, whichever path arrives first (checkout verify, webhook, reconcile) and
however often: every path funnels into `Billing.settle_*`, which
  1. claims the `billing_payments` row (insert-if-new, then `FOR UPDATE`), so one
     request at a time decides for a payment;
  2. checks amount and currency against what WE stored (a mismatch grants nothing
     and records an alert);
  3. asks the ledger for a grant keyed `payment:<payment id>`. The grant commits in
     the ledger's own transaction; if ours then fails, the next attempt gets the
     same grant replayed (same key, same parameters, all derived from stored rows)
     and records it. Refunds work the same way with a `clawback` keyed
     `refund:<refund id>`.

Plans: every paid period (a subscription's charge, or a plan bought as one order) and
every cancellation emits `billing.subscription.changed` in the same transaction
(`ledger.outbox`, relayed to `<prefix>.events.ledger`): {subscription_id, user_id, item,
status "active" | "cancelled", expires_at (the paid period's end)}. The enhancement
service sets tiers from it.

A refund webhook can overtake its payment (a subscription's `refund.processed` before
`subscription.charged`): its event is kept as `pending_payment` (answered 202), never
marked done; a redelivery processes it again, and the reconcile job asks Razorpay for
the payment and applies the refund once the payment is ours.
"""

from __future__ import annotations

import calendar
import hashlib
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from services.kit.authority import Permit
from services.kit.errors import (
    BadRequest,
    Conflict,
    NotFound,
    ServiceUnavailable,
    Unprocessable,
    UpstreamError,
)
from services.kit.outbox import emit
from services.kit.principal import service_principal
from services.ledger.billing.razorpay_api import RazorpayAPI, signature_ok
from services.ledger.billing.repository import BillingRepository
from services.ledger.config import LedgerSettings
from services.ledger.models import outbox
from services.ledger.repository import LedgerRepository
from services.ledger.service import Ledger

log = logging.getLogger("ku.ledger.billing")

BILLING = service_principal("billing")
# Billing runs inside the ledger service: its lane is granting what was paid for and
# clawing back what was refunded, for any user (the authority table's `billing` row).
BILLING_AUTH = {"user": "any", "owner": "service:billing", "holds": "*", "charges": "*"}
# Razorpay subscriptions need a finite count: ten years of renewals.
TOTAL_COUNT = {"month": 120, "year": 10}


# A refund whose payment we do not know yet (it overtook `subscription.charged`, or the
# capture): kept, not lost. The reconcile job and any redelivery process it again.
PENDING_PAYMENT = "pending_payment"
RETRY_OUTCOMES = frozenset({PENDING_PAYMENT})
SUBSCRIPTION_CHANGED = "billing.subscription.changed"


@dataclass
class Settled:
    """What one path did for one payment."""

    outcome: str  # granted | already_granted | rejected | ignored | failed | not_captured ...
    payment: dict[str, Any] | None = None
    payment_id: str | None = None  # when there is no payment row (yet)


def add_period(start: datetime, period: str) -> datetime:
    """`start` plus one calendar month or year (the 31st becomes the month's last day)."""
    months = 1 if period == "month" else 12
    index = start.month - 1 + months
    year, month = start.year + index // 12, index % 12 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return start.replace(year=year, month=month, day=day)


def from_unix(value: Any) -> datetime | None:
    return datetime.fromtimestamp(int(value), UTC) if value else None


def _terms(item: dict[str, Any]) -> dict[str, Any]:
    """What an order or subscription keeps of its catalog item: the price it was sold at."""
    return {
        "item_id": item["id"],
        "item_name": item["name"],
        "credits_milli": item["credits_milli"],
        "amount_minor": item["price_minor"],
        "currency": item["currency"],
        "period": item["period"],
    }


def _is_captured(entity: dict[str, Any]) -> bool:
    # A refunded payment was captured first: its status moved on, `captured` did not.
    return entity.get("status") == "captured" or entity.get("captured") is True


class Billing:
    def __init__(self, session: AsyncSession, ledger: Ledger, settings: LedgerSettings) -> None:
        self.repo = BillingRepository(session)
        self.ledger = ledger
        self.settings = settings
        self.api = RazorpayAPI(settings)

    # Catalog

    async def put_item(self, item_id: str, values: dict[str, Any]) -> dict[str, Any]:
        if (values["kind"] == "plan") != (values["period"] is not None):
            raise Unprocessable(
                "A plan has a period (month or year); a top-up has none",
                code="period_mismatch",
            )
        return await self.repo.put_item(item_id, values)

    async def _sellable(self, item_id: str) -> dict[str, Any]:
        item = await self.repo.item(item_id)
        if item is None or not item["active"]:
            raise NotFound("No such item in the catalog", code="unknown_item", item=item_id)
        return item

    async def _require_wallet(self, user_id: str) -> None:
        if not await self.repo.wallet_exists(user_id):
            raise NotFound("No ledger account for this user", code="unknown_user", user_id=user_id)

    # Orders and checkout

    async def create_order(self, user_id: str, item_id: str) -> dict[str, Any]:
        item = await self._sellable(item_id)
        await self._require_wallet(user_id)
        order_id = f"kuord_{uuid.uuid4().hex}"
        remote = await self.api.create_order(
            amount=item["price_minor"],
            currency=item["currency"],
            receipt=order_id,
            notes={"ku_order_id": order_id, "user_id": user_id, "item": item_id},
        )
        if (
            int(remote.get("amount", -1)) != item["price_minor"]
            or remote.get("currency") != item["currency"]
        ):
            raise UpstreamError("Razorpay created a different order", code="razorpay_mismatch")
        order = await self.repo.insert_order(
            {
                "id": order_id,
                "user_id": user_id,
                **_terms(item),
                "razorpay_order_id": remote["id"],
            }
        )
        return {**order, "key_id": self.api.key_id}

    async def verify_checkout(
        self, permit: Permit, razorpay_order_id: str, payment_id: str, signature: str
    ) -> Settled:
        """Checkout's handler: the signature must match the order we stored, for its user,
        who must be the caller's (`permit`, the table's `billing.buy`: a user token its
        own, a partner its linked users)."""
        order = await self.repo.order_by_razorpay_id(razorpay_order_id)
        if order is None:
            raise BadRequest("Unknown order", code="unknown_order")
        await LedgerRepository(self.repo.session).check_user(permit, order["user_id"])
        self.api.require_configured()
        if not self.api.checkout_signature_ok(order["razorpay_order_id"], payment_id, signature):
            raise BadRequest("Payment signature does not match", code="invalid_signature")
        entity = await self.api.fetch_payment(payment_id)
        if entity.get("order_id") != order["razorpay_order_id"]:
            raise BadRequest("The payment is not for this order", code="payment_order_mismatch")
        if not _is_captured(entity):
            return Settled("pending" if entity.get("status") == "authorized" else "not_captured")
        return await self.settle_order(order, entity)

    async def settle_order(self, order: dict[str, Any], entity: dict[str, Any]) -> Settled:
        period = order["period"]
        settled = await self._settle(
            entity,
            user_id=order["user_id"],
            order_id=order["id"],
            subscription_id=None,
            item_id=order["item_id"],
            expected=(order["amount_minor"], order["currency"]),
            credits_milli=order["credits_milli"],
            source="purchase" if period is None else "subscription",
            # A plan bought as an order runs one period from the order: derived from
            # stored data so every path asks the ledger for the very same grant.
            expires_at=add_period(order["created_at"], period) if period else None,
            period=(order["created_at"], add_period(order["created_at"], period))
            if period
            else (None, None),
            description=f"{order['item_name']} (order {order['id']})",
        )
        if settled.outcome in ("granted", "already_granted"):
            await self.repo.mark_order_paid(order["id"])
        if settled.outcome == "granted" and period:
            await self._subscription_event(
                order["id"], order, "active", add_period(order["created_at"], period)
            )
        return settled

    # Subscriptions

    async def create_subscription(self, user_id: str, item_id: str) -> dict[str, Any]:
        item = await self._sellable(item_id)
        if item["kind"] != "plan":
            raise Unprocessable("Only plans can be subscribed to", code="not_a_plan")
        await self._require_wallet(user_id)
        plan_id = item["razorpay_plan_id"]
        if plan_id is None:
            plan = await self.api.create_plan(
                period=item["period"],
                name=item["name"],
                amount=item["price_minor"],
                currency=item["currency"],
                notes={"ku_item": item_id},
            )
            plan_id = await self.repo.set_plan_id(item_id, plan["id"])
        subscription_id = f"kusub_{uuid.uuid4().hex}"
        remote = await self.api.create_subscription(
            plan_id=plan_id,
            total_count=TOTAL_COUNT[item["period"]],
            notes={"ku_subscription_id": subscription_id, "user_id": user_id, "item": item_id},
        )
        row = await self.repo.insert_subscription(
            {
                "id": subscription_id,
                "user_id": user_id,
                **_terms(item),
                "razorpay_plan_id": plan_id,
                "razorpay_subscription_id": remote["id"],
                "status": remote.get("status") or "created",
            }
        )
        return {**row, "key_id": self.api.key_id}

    async def subscription_charged(
        self,
        subscription: dict[str, Any],
        entity: dict[str, Any],
        period_start: datetime | None,
        period_end: datetime | None,
    ) -> Settled:
        """One period paid: grant its allowance, expiring at the period's end."""
        sub = await self.repo.subscription_by_razorpay_id(subscription["id"], lock=True)
        if sub is None:
            return Settled("unknown_subscription")
        if period_end is None:
            return Settled("no_period")
        values = {
            "user_id": sub["user_id"],
            "order_id": None,
            "subscription_id": sub["id"],
            "item_id": sub["item_id"],
        }
        cancelled_at = sub["cancelled_at"]
        if sub["status"] == "cancelled" and (period_start is None or period_start >= cancelled_at):
            # A renewal after cancellation grants nothing; someone must refund it.
            row = await self._claim(entity, values, "ignored", (period_start, period_end), None)
            await self.repo.alert(
                "charged_after_cancellation",
                payment_id=entity["id"],
                order_id=None,
                user_id=sub["user_id"],
                detail={
                    "subscription_id": sub["id"],
                    "amount": entity.get("amount"),
                    "currency": entity.get("currency"),
                    "period_start": str(period_start),
                    "cancelled_at": str(cancelled_at),
                },
            )
            return Settled("ignored", row)
        if subscription.get("status"):
            await self.repo.set_subscription_status(sub["id"], str(subscription["status"]))
        settled = await self._settle(
            entity,
            **values,
            expected=(sub["amount_minor"], sub["currency"]),
            credits_milli=sub["credits_milli"],
            source="subscription",
            expires_at=period_end,
            period=(period_start, period_end),
            description=f"{sub['item_name']} until {period_end.date().isoformat()}",
        )
        if settled.outcome == "granted":
            await self._subscription_event(sub["id"], sub, "active", period_end)
        return settled

    async def subscription_cancelled(self, subscription: dict[str, Any]) -> Settled:
        sub = await self.repo.subscription_by_razorpay_id(subscription["id"], lock=True)
        if sub is None:
            return Settled("unknown_subscription")
        await self.repo.set_subscription_status(sub["id"], "cancelled")
        await self._subscription_event(sub["id"], sub, "cancelled", None)
        return Settled("cancelled")

    async def _subscription_event(
        self,
        subscription_id: str,
        terms: dict[str, Any],
        status: str,
        expires_at: datetime | None,
    ) -> None:
        """A plan paid for a period, or cancelled: in this transaction, for consumers of
        the ledger's stream (the enhancement service's tiers)."""
        await emit(
            self.repo.session,
            outbox,
            SUBSCRIPTION_CHANGED,
            {
                "subscription_id": subscription_id,
                "user_id": terms["user_id"],
                "item": terms["item_id"],
                "status": status,
                "expires_at": expires_at.isoformat() if expires_at else None,
            },
        )

    # Any captured payment (webhooks, reconciliation)

    async def settle_payment(self, entity: dict[str, Any], *, fetch_invoices: bool) -> Settled:
        """Map a Razorpay payment to our order (or, reconciling, subscription) and settle it."""
        if not _is_captured(entity):
            return Settled("not_captured")
        order = (
            await self.repo.order_by_razorpay_id(entity["order_id"])
            if entity.get("order_id")
            else None
        )
        if order is not None:
            return await self.settle_order(order, entity)
        if entity.get("invoice_id") and fetch_invoices:
            invoice = await self.api.fetch_invoice(entity["invoice_id"])
            if invoice.get("subscription_id"):
                return await self.subscription_charged(
                    {"id": invoice["subscription_id"]},
                    entity,
                    from_unix(invoice.get("billing_start")),
                    from_unix(invoice.get("billing_end")),
                )
        if entity.get("invoice_id"):
            # A subscription's payment: `subscription.charged` carries its period.
            return Settled("subscription_payment")
        return Settled("unknown_order")

    async def payment_failed(self, entity: dict[str, Any]) -> Settled:
        """Record a failure; a payment captured before stays captured (and granted)."""
        order = (
            await self.repo.order_by_razorpay_id(entity["order_id"])
            if entity.get("order_id")
            else None
        )
        if order is None:
            return Settled("unknown_order")
        values = {
            "user_id": order["user_id"],
            "order_id": order["id"],
            "subscription_id": None,
            "item_id": order["item_id"],
        }
        row = await self._claim(entity, values, "failed", (None, None), None)
        return Settled("failed" if row["status"] == "failed" else "ignored", row)

    # Refunds

    async def refund(self, refund: dict[str, Any], entity: dict[str, Any] | None) -> Settled:
        """Claw back the refunded share of what the payment granted; spent credit is debt."""
        payment_id = refund["payment_id"]
        row = await self.repo.payment(payment_id, lock=True)
        if (row is None or row["grant_transaction_id"] is None) and entity is not None:
            # The refund overtook the capture: grant first, so the clawback has a base.
            await self.settle_payment(entity, fetch_invoices=False)
            row = await self.repo.payment(payment_id, lock=True)
        if row is None:
            return Settled(PENDING_PAYMENT, payment_id=str(payment_id))
        if await self.repo.refund_exists(refund["id"]):
            return Settled("duplicate_refund", row)
        amount = int(refund["amount"])
        granted = row["granted_milli"]
        if amount >= row["amount_minor"]:
            clawback = granted
        else:
            # Exact integers; a partial refund rounds in the user's favour by < 1 milli-Ku.
            clawback = granted * amount // row["amount_minor"]
        taken = debt = 0
        transaction_id = None
        if clawback > 0:
            source = await self._grant_source(row)
            op = {
                "op": "clawback",
                "user_id": row["user_id"],
                "amount": clawback,
                "source": source,
                "grant_reference": payment_id,
                "reference": refund["id"],
                "description": f"Refund {refund['id']} of payment {payment_id}",
                "app": "billing",
                "auth": BILLING_AUTH,
            }
            try:
                outcome = await self.ledger.execute(op, BILLING, key=f"refund:{refund['id']}")
                body = outcome.body
                transaction_id = int(body["transaction_id"])
                taken, debt = int(body["taken_milli"]), int(body["debt_added_milli"])
            except Conflict as exc:
                if exc.code != "idempotency_key_reused":
                    raise
                found = await self.repo.clawback_transaction(refund["id"])
                if found is None:
                    raise
                transaction_id = found["transaction_id"]
                taken, debt = int(found["taken_milli"]), int(found["debt_added_milli"])
        await self.repo.insert_refund(
            {
                "razorpay_refund_id": refund["id"],
                "razorpay_payment_id": payment_id,
                "amount_minor": amount,
                "clawback_milli": clawback,
                "taken_milli": taken,
                "debt_milli": debt,
                "transaction_id": transaction_id,
            }
        )
        await self.repo.record_refund(
            payment_id, amount_minor=amount, taken_milli=taken, debt_milli=debt
        )
        return Settled("clawed_back" if clawback else "refund_recorded", row)

    async def replay_refunds(self, entity: dict[str, Any]) -> list[Settled]:
        """Reconciling: apply refunds Razorpay made that no webhook reported."""
        refunded = int(entity.get("amount_refunded") or 0)
        row = await self.repo.payment(str(entity["id"]))
        if row is None or refunded <= row["refunded_minor"]:
            return []
        return [
            await self.refund(refund, entity)
            for refund in await self.api.payment_refunds(str(entity["id"]))
            if refund.get("status") == "processed"
        ]

    async def _grant_source(self, row: dict[str, Any]) -> str:
        return "purchase" if row["expires_at"] is None else "subscription"

    # Revenue

    async def revenue(self, month: str | None = None) -> dict[str, Any]:
        """What payments brought in during a calendar month (UTC, default this one), by
        currency, net of refunds."""
        if month is None:
            now = datetime.now(UTC)
            start = datetime(now.year, now.month, 1, tzinfo=UTC)
        else:
            year, number = month.split("-")
            start = datetime(int(year), int(number), 1, tzinfo=UTC)
        rows = await self.repo.revenue(start, add_period(start, "month"))
        return {
            "month": f"{start:%Y-%m}",
            "items": [
                {
                    "currency": r["currency"],
                    "payments": r["payments"],
                    "captured": r["captured_minor"],
                    "refunded": r["refunded_minor"],
                    "net": r["captured_minor"] - r["refunded_minor"],
                }
                for r in rows
            ],
        }

    # Webhooks

    async def handle_webhook(
        self, raw: bytes, signature: str | None, event_id: str | None
    ) -> dict[str, Any]:
        secret = self.settings.razorpay_webhook_secret
        if not secret:
            raise ServiceUnavailable(
                "Webhooks are not configured (KU_RAZORPAY_WEBHOOK_SECRET)",
                code="billing_not_configured",
            )
        # Over the exact bytes received: a re-serialised body is a different message.
        if not signature_ok(secret, raw, signature):
            raise BadRequest("Webhook signature does not match", code="invalid_signature")
        try:
            event = orjson.loads(raw)
            name = str(event["event"])
            payload = event.get("payload") or {}
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise BadRequest(
                "Webhook body is not a Razorpay event", code="malformed_event"
            ) from None
        if not event_id:
            event_id = "sha256:" + hashlib.sha256(raw).hexdigest()
        if not await self.repo.claim_event(event_id, name, retry=RETRY_OUTCOMES):
            return {"status": "duplicate", "event": name, "outcome": None}
        settled = await self._dispatch(name, payload)
        payment_id = (
            settled.payment["razorpay_payment_id"] if settled.payment else settled.payment_id
        )
        await self.repo.finish_event(event_id, settled.outcome, payment_id)
        log.info("razorpay %s %s: %s", name, event_id, settled.outcome)
        status = "pending" if settled.outcome in RETRY_OUTCOMES else "processed"
        return {"status": status, "event": name, "outcome": settled.outcome}

    async def retry_pending_refund(self, event: dict[str, Any], entity: dict[str, Any]) -> str:
        """Reconciling a refund event that arrived before its payment: settle the payment
        as Razorpay reports it now, apply its refunds, and close the event once the payment
        is ours. Returns the event's outcome (still `pending_payment` if it is not)."""
        await self.settle_payment(entity, fetch_invoices=True)
        refunds = await self.replay_refunds(entity)
        if await self.repo.payment(str(entity["id"])) is None:
            return PENDING_PAYMENT
        outcomes = [r.outcome for r in refunds]
        outcome = next((o for o in outcomes if o == "clawed_back"), None) or (
            outcomes[0] if outcomes else "refund_already_applied"
        )
        await self.repo.finish_event(event["event_id"], outcome, str(entity["id"]))
        return outcome

    async def _dispatch(self, name: str, payload: dict[str, Any]) -> Settled:
        def entity(kind: str) -> dict[str, Any] | None:
            found = (payload.get(kind) or {}).get("entity")
            return found if isinstance(found, dict) else None

        payment = entity("payment")
        try:
            if name in ("payment.captured", "order.paid") and payment:
                return await self.settle_payment(payment, fetch_invoices=False)
            if name == "payment.failed" and payment:
                return await self.payment_failed(payment)
            if name == "refund.processed" and entity("refund"):
                return await self.refund(entity("refund"), payment)  # type: ignore[arg-type]
            subscription = entity("subscription")
            if name == "subscription.charged" and subscription and payment:
                return await self.subscription_charged(
                    subscription,
                    payment,
                    from_unix(subscription.get("current_start")),
                    from_unix(subscription.get("current_end")),
                )
            if name == "subscription.cancelled" and subscription:
                return await self.subscription_cancelled(subscription)
        except (KeyError, TypeError, ValueError):
            raise BadRequest("Webhook payload is incomplete", code="malformed_event") from None
        return Settled("ignored_event")

    # The one place that grants

    async def _claim(
        self,
        entity: dict[str, Any],
        values: dict[str, Any],
        status: str,
        period: tuple[datetime | None, datetime | None],
        expires_at: datetime | None,
    ) -> dict[str, Any]:
        return await self.repo.claim_payment(
            {
                **values,
                "razorpay_payment_id": entity["id"],
                "amount_minor": int(entity["amount"]),
                "currency": str(entity["currency"]),
                "status": status,
                "expires_at": expires_at,
                "period_start": period[0],
                "period_end": period[1],
            }
        )

    async def _settle(
        self,
        entity: dict[str, Any],
        *,
        user_id: str,
        order_id: str | None,
        subscription_id: str | None,
        item_id: str,
        expected: tuple[int, str],
        credits_milli: int,
        source: str,
        expires_at: datetime | None,
        period: tuple[datetime | None, datetime | None],
        description: str,
    ) -> Settled:
        payment_id = str(entity["id"])
        values = {
            "user_id": user_id,
            "order_id": order_id,
            "subscription_id": subscription_id,
            "item_id": item_id,
        }
        paid = (int(entity["amount"]), str(entity["currency"]))
        if paid != expected:
            row = await self._claim(entity, values, "rejected", period, expires_at)
            if row["grant_transaction_id"] is None and row["status"] != "rejected":
                await self.repo.set_payment_status(payment_id, "rejected")
            await self.repo.alert(
                "amount_mismatch",
                payment_id=payment_id,
                order_id=order_id or subscription_id,
                user_id=user_id,
                detail={
                    "expected_amount": expected[0],
                    "expected_currency": expected[1],
                    "paid_amount": paid[0],
                    "paid_currency": paid[1],
                },
            )
            log.error(
                "payment %s: paid %s, expected %s; nothing granted", payment_id, paid, expected
            )
            return Settled("rejected", await self.repo.payment(payment_id))
        row = await self._claim(entity, values, "captured", period, expires_at)
        if row["grant_transaction_id"] is not None:
            return Settled("already_granted", row)
        if row["status"] in ("rejected", "ignored"):
            return Settled(row["status"], row)
        op = {
            "op": "grant",
            "user_id": user_id,
            "amount": credits_milli,
            "source": source,
            "expires_at": expires_at.isoformat() if expires_at else None,
            "reference": payment_id,
            "description": description,
            "app": "billing",
            "auth": BILLING_AUTH,
        }
        try:
            outcome = await self.ledger.execute(op, BILLING, key=f"payment:{payment_id}")
            transaction_id = int(outcome.body["transaction_id"])
            granted = int(outcome.body["amount_milli"])
        except Conflict as exc:
            # Granted before with other parameters (a catalog or period changed between
            # paths): the first grant stands; record it.
            if exc.code != "idempotency_key_reused":
                raise
            found = await self.repo.grant_transaction(payment_id)
            if found is None:
                raise
            transaction_id, granted = found["transaction_id"], found["amount_milli"]
        except Unprocessable as exc:
            if exc.code != "already_expired":
                raise
            await self.repo.set_payment_status(payment_id, "ignored")
            await self.repo.alert(
                "period_over_before_grant",
                payment_id=payment_id,
                order_id=order_id or subscription_id,
                user_id=user_id,
                detail={"expires_at": str(expires_at)},
            )
            return Settled("ignored", await self.repo.payment(payment_id))
        row = await self.repo.record_grant(
            payment_id, granted_milli=granted, transaction_id=transaction_id
        )
        return Settled("granted", row)
