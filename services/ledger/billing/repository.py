"""Every SQL statement of billing. Rows come back as plain dicts."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

_PAYMENT_COLUMNS = (
    "razorpay_payment_id, user_id, order_id, subscription_id, item_id, amount_minor, currency,"
    " status, granted_milli, grant_transaction_id, expires_at, period_start, period_end,"
    " refunded_minor, clawed_back_milli, debt_milli, created_at, updated_at, granted_at"
)


def _one(result: Any) -> dict[str, Any] | None:
    row = result.first()
    return dict(row._mapping) if row else None


class BillingRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def _run(self, sql: str, **params: Any) -> Any:
        return await self.session.execute(text(sql), params)

    # Catalog

    async def catalog(self, *, include_inactive: bool) -> list[dict[str, Any]]:
        where = "" if include_inactive else " WHERE active"
        rows = await self._run(
            "SELECT * FROM ledger.billing_catalog" + where + " ORDER BY kind DESC, price_minor, id"
        )
        return [dict(r._mapping) for r in rows]

    async def item(self, item_id: str) -> dict[str, Any] | None:
        return _one(
            await self._run("SELECT * FROM ledger.billing_catalog WHERE id = :i", i=item_id)
        )

    async def put_item(self, item_id: str, values: dict[str, Any]) -> dict[str, Any]:
        """Create or replace an item. A changed price or period drops the Razorpay plan
        (plans are immutable there); the next subscription creates a new one."""
        row = await self._run(
            """
            INSERT INTO ledger.billing_catalog AS c
                   (id, kind, name, credits_milli, price_minor, currency, period, active)
            VALUES (:id, :kind, :name, :credits_milli, :price_minor, :currency, :period, :active)
            ON CONFLICT (id) DO UPDATE SET
                   kind = EXCLUDED.kind, name = EXCLUDED.name,
                   credits_milli = EXCLUDED.credits_milli, price_minor = EXCLUDED.price_minor,
                   currency = EXCLUDED.currency, period = EXCLUDED.period,
                   active = EXCLUDED.active, updated_at = now(),
                   razorpay_plan_id = CASE
                     WHEN (c.price_minor, c.currency, c.period)
                          IS NOT DISTINCT FROM (EXCLUDED.price_minor, EXCLUDED.currency,
                                                EXCLUDED.period)
                     THEN c.razorpay_plan_id END
            RETURNING *
            """,
            id=item_id,
            **values,
        )
        return dict(row.one()._mapping)

    async def set_plan_id(self, item_id: str, plan_id: str) -> str:
        """Record the Razorpay plan of an item; the first writer wins."""
        await self._run(
            "UPDATE ledger.billing_catalog SET razorpay_plan_id = :p"
            " WHERE id = :i AND razorpay_plan_id IS NULL",
            i=item_id,
            p=plan_id,
        )
        row = await self._run(
            "SELECT razorpay_plan_id FROM ledger.billing_catalog WHERE id = :i", i=item_id
        )
        return str(row.scalar_one())

    # Orders and subscriptions

    async def wallet_exists(self, user_id: str) -> bool:
        row = await self._run("SELECT 1 FROM ledger.wallets WHERE user_id = :u", u=user_id)
        return row.first() is not None

    async def insert_order(self, values: dict[str, Any]) -> dict[str, Any]:
        row = await self._run(
            """
            INSERT INTO ledger.billing_orders
                   (id, user_id, item_id, item_name, credits_milli, amount_minor, currency,
                    period, razorpay_order_id)
            VALUES (:id, :user_id, :item_id, :item_name, :credits_milli, :amount_minor,
                    :currency, :period, :razorpay_order_id)
            RETURNING *
            """,
            **values,
        )
        return dict(row.one()._mapping)

    async def order_by_razorpay_id(self, razorpay_order_id: str) -> dict[str, Any] | None:
        return _one(
            await self._run(
                "SELECT * FROM ledger.billing_orders WHERE razorpay_order_id = :o",
                o=razorpay_order_id,
            )
        )

    async def mark_order_paid(self, order_id: str) -> None:
        await self._run(
            "UPDATE ledger.billing_orders SET status = 'paid', paid_at = COALESCE(paid_at, now())"
            " WHERE id = :o",
            o=order_id,
        )

    async def insert_subscription(self, values: dict[str, Any]) -> dict[str, Any]:
        row = await self._run(
            """
            INSERT INTO ledger.billing_subscriptions
                   (id, user_id, item_id, item_name, credits_milli, amount_minor, currency,
                    period, razorpay_plan_id, razorpay_subscription_id, status)
            VALUES (:id, :user_id, :item_id, :item_name, :credits_milli, :amount_minor,
                    :currency, :period, :razorpay_plan_id, :razorpay_subscription_id, :status)
            RETURNING *
            """,
            **values,
        )
        return dict(row.one()._mapping)

    async def subscription_by_razorpay_id(
        self, razorpay_subscription_id: str, *, lock: bool = False
    ) -> dict[str, Any] | None:
        return _one(
            await self._run(
                "SELECT * FROM ledger.billing_subscriptions WHERE razorpay_subscription_id = :s"
                + (" FOR UPDATE" if lock else ""),
                s=razorpay_subscription_id,
            )
        )

    async def set_subscription_status(self, subscription_id: str, status: str) -> None:
        """Follow Razorpay's status, except that a cancellation is final."""
        await self._run(
            """
            UPDATE ledger.billing_subscriptions
               SET status = :st, updated_at = now(),
                   cancelled_at = CASE WHEN :st = 'cancelled' THEN COALESCE(cancelled_at, now())
                                  ELSE cancelled_at END
             WHERE id = :s AND status <> 'cancelled'
            """,
            s=subscription_id,
            st=status,
        )

    # Payments

    async def claim_payment(self, values: dict[str, Any]) -> dict[str, Any]:
        """Insert the payment if new, then return it locked: one writer per payment."""
        await self._run(
            """
            INSERT INTO ledger.billing_payments
                   (razorpay_payment_id, user_id, order_id, subscription_id, item_id,
                    amount_minor, currency, status, expires_at, period_start, period_end)
            VALUES (:razorpay_payment_id, :user_id, :order_id, :subscription_id, :item_id,
                    :amount_minor, :currency, :status, :expires_at, :period_start, :period_end)
            ON CONFLICT (razorpay_payment_id) DO NOTHING
            """,
            **values,
        )
        row = await self.payment(values["razorpay_payment_id"], lock=True)
        assert row is not None
        return row

    async def payment(self, payment_id: str, *, lock: bool = False) -> dict[str, Any] | None:
        return _one(
            await self._run(
                f"SELECT {_PAYMENT_COLUMNS} FROM ledger.billing_payments"
                " WHERE razorpay_payment_id = :p" + (" FOR UPDATE" if lock else ""),
                p=payment_id,
            )
        )

    async def set_payment_status(self, payment_id: str, status: str) -> None:
        await self._run(
            "UPDATE ledger.billing_payments SET status = :s, updated_at = now()"
            " WHERE razorpay_payment_id = :p",
            p=payment_id,
            s=status,
        )

    async def record_grant(
        self, payment_id: str, *, granted_milli: int, transaction_id: int | None
    ) -> dict[str, Any]:
        row = await self._run(
            f"""
            UPDATE ledger.billing_payments
               SET granted_milli = :g, grant_transaction_id = :t, granted_at = now(),
                   updated_at = now(),
                   status = CASE WHEN status = 'failed' THEN 'captured' ELSE status END
             WHERE razorpay_payment_id = :p
            RETURNING {_PAYMENT_COLUMNS}
            """,
            p=payment_id,
            g=granted_milli,
            t=transaction_id,
        )
        return dict(row.one()._mapping)

    async def grant_transaction(self, payment_id: str) -> dict[str, Any] | None:
        """The ledger's grant for a payment (its reference is the payment id)."""
        return _one(
            await self._run(
                "SELECT id AS transaction_id, amount_milli FROM ledger.transactions"
                " WHERE kind = 'grant' AND app = 'billing' AND reference = :p"
                " ORDER BY id LIMIT 1",
                p=payment_id,
            )
        )

    async def clawback_transaction(self, refund_id: str) -> dict[str, Any] | None:
        return _one(
            await self._run(
                "SELECT t.id AS transaction_id, -t.delta_milli AS taken_milli,"
                " t.amount_milli + t.delta_milli AS debt_added_milli"
                " FROM ledger.transactions t"
                " WHERE t.kind = 'clawback' AND t.app = 'billing' AND t.reference = :r"
                " ORDER BY t.id LIMIT 1",
                r=refund_id,
            )
        )

    async def insert_refund(self, values: dict[str, Any]) -> bool:
        row = await self._run(
            """
            INSERT INTO ledger.billing_refunds
                   (razorpay_refund_id, razorpay_payment_id, amount_minor, clawback_milli,
                    taken_milli, debt_milli, transaction_id)
            VALUES (:razorpay_refund_id, :razorpay_payment_id, :amount_minor, :clawback_milli,
                    :taken_milli, :debt_milli, :transaction_id)
            ON CONFLICT (razorpay_refund_id) DO NOTHING
            RETURNING razorpay_refund_id
            """,
            **values,
        )
        return row.first() is not None

    async def refund_exists(self, refund_id: str) -> bool:
        row = await self._run(
            "SELECT 1 FROM ledger.billing_refunds WHERE razorpay_refund_id = :r", r=refund_id
        )
        return row.first() is not None

    async def record_refund(
        self, payment_id: str, *, amount_minor: int, taken_milli: int, debt_milli: int
    ) -> None:
        await self._run(
            """
            UPDATE ledger.billing_payments
               SET refunded_minor = refunded_minor + :a,
                   clawed_back_milli = clawed_back_milli + :t,
                   debt_milli = debt_milli + :d, updated_at = now(),
                   status = CASE
                     WHEN status NOT IN ('captured', 'partially_refunded', 'refunded')
                       THEN status
                     WHEN refunded_minor + :a >= amount_minor THEN 'refunded'
                     ELSE 'partially_refunded' END
             WHERE razorpay_payment_id = :p
            """,
            p=payment_id,
            a=amount_minor,
            t=taken_milli,
            d=debt_milli,
        )

    async def payments_of(self, user_id: str, *, limit: int) -> list[dict[str, Any]]:
        rows = await self._run(
            f"SELECT {_PAYMENT_COLUMNS} FROM ledger.billing_payments WHERE user_id = :u"
            " ORDER BY created_at DESC, razorpay_payment_id LIMIT :l",
            u=user_id,
            l=limit,
        )
        return [dict(r._mapping) for r in rows]

    async def revenue(self, start: datetime, end: datetime) -> list[dict[str, Any]]:
        """Money received in [start, end) by currency: payments captured then (by when we
        recorded them), less what was refunded of them. Rejected (amount mismatch) and
        ignored (charged after cancellation) payments are owed back: not revenue."""
        rows = await self._run(
            """
            SELECT currency, count(*) AS payments, sum(amount_minor)::bigint AS captured_minor,
                   sum(refunded_minor)::bigint AS refunded_minor
              FROM ledger.billing_payments
             WHERE status IN ('captured', 'refunded', 'partially_refunded')
               AND created_at >= :s AND created_at < :e
             GROUP BY currency ORDER BY currency
            """,
            s=start,
            e=end,
        )
        return [dict(r._mapping) for r in rows]

    async def recent_payments(self, *, limit: int) -> list[dict[str, Any]]:
        """Every user's payments, newest first (the operators' view)."""
        rows = await self._run(
            f"SELECT {_PAYMENT_COLUMNS} FROM ledger.billing_payments"
            " ORDER BY created_at DESC, razorpay_payment_id LIMIT :l",
            l=limit,
        )
        return [dict(r._mapping) for r in rows]

    # Webhook events and alerts

    async def claim_event(self, event_id: str, event: str, *, retry: frozenset[str]) -> bool:
        """Record a delivery; False when this event id was handled before, unless its
        outcome is one of `retry` (then it is locked for this attempt)."""
        row = await self._run(
            "INSERT INTO ledger.billing_webhook_events (event_id, event) VALUES (:i, :e)"
            " ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
            i=event_id,
            e=event,
        )
        if row.first() is not None:
            return True
        outcome = await self._run(
            "SELECT outcome FROM ledger.billing_webhook_events WHERE event_id = :i FOR UPDATE",
            i=event_id,
        )
        return outcome.scalar_one_or_none() in retry

    async def pending_events(self, outcome: str, *, limit: int) -> list[dict[str, Any]]:
        """Deliveries left waiting with `outcome`, oldest first."""
        rows = await self._run(
            "SELECT event_id, event, razorpay_payment_id FROM ledger.billing_webhook_events"
            " WHERE outcome = :o ORDER BY received_at LIMIT :l",
            o=outcome,
            l=limit,
        )
        return [dict(r._mapping) for r in rows]

    async def lock_event(self, event_id: str, outcome: str) -> bool:
        """Lock a delivery still waiting with `outcome`; False if it moved on or another
        transaction holds it."""
        row = await self._run(
            "SELECT 1 FROM ledger.billing_webhook_events WHERE event_id = :i AND outcome = :o"
            " FOR UPDATE SKIP LOCKED",
            i=event_id,
            o=outcome,
        )
        return row.first() is not None

    async def finish_event(self, event_id: str, outcome: str, payment_id: str | None) -> None:
        await self._run(
            "UPDATE ledger.billing_webhook_events SET outcome = :o, razorpay_payment_id = :p"
            " WHERE event_id = :i",
            i=event_id,
            o=outcome,
            p=payment_id,
        )

    async def event_outcome(self, event_id: str) -> str | None:
        row = await self._run(
            "SELECT outcome FROM ledger.billing_webhook_events WHERE event_id = :i", i=event_id
        )
        return row.scalar_one_or_none()

    async def alert(
        self,
        kind: str,
        *,
        payment_id: str | None,
        order_id: str | None,
        user_id: str | None,
        detail: dict[str, Any],
    ) -> None:
        await self._run(
            "INSERT INTO ledger.billing_alerts (kind, razorpay_payment_id, order_id, user_id,"
            " detail) VALUES (:k, :p, :o, :u, CAST(:d AS jsonb))"
            " ON CONFLICT (kind, razorpay_payment_id) DO NOTHING",
            k=kind,
            p=payment_id,
            o=order_id,
            u=user_id,
            d=orjson.dumps(detail).decode(),
        )

    async def alerts(self, *, since: datetime | None, limit: int) -> list[dict[str, Any]]:
        rows = await self._run(
            "SELECT * FROM ledger.billing_alerts"
            " WHERE CAST(:s AS timestamptz) IS NULL OR created_at >= CAST(:s AS timestamptz)"
            " ORDER BY id DESC LIMIT :l",
            s=since,
            l=limit,
        )
        return [dict(r._mapping) for r in rows]
