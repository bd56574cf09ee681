"""Billing tables, in the ledger's schema (prefixed `billing_`).

A payment's life: an order (ours, mirrored at Razorpay with `receipt` = our id) is
paid; the captured payment becomes one `billing_payments` row, keyed by Razorpay's
payment id, and one ledger grant keyed `payment:<id>`. Money amounts are integer
minor units (`*_minor`, cents) with a currency; credits are milli-Ku (`*_milli`).
The ledger grant is committed in its own transaction: these rows are only a record
of it, so every step re-derives the same grant and the ledger replays it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Index,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from services.ledger.models import Base


def _created() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class CatalogItem(Base):
    """A top-up pack or a plan. Editable by admins; orders snapshot what they sold."""

    __tablename__ = "billing_catalog"
    __table_args__ = (
        CheckConstraint("kind IN ('topup', 'plan')", name="kind_known"),
        CheckConstraint("credits_milli > 0", name="credits_positive"),
        CheckConstraint("price_minor > 0", name="price_positive"),
        CheckConstraint(
            "(kind = 'plan' AND period IN ('month', 'year'))"
            " OR (kind = 'topup' AND period IS NULL)",
            name="period_matches_kind",
        ),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    credits_milli: Mapped[int] = mapped_column(BigInteger, nullable=False)
    price_minor: Mapped[int] = mapped_column(BigInteger, nullable=False)
    currency: Mapped[str] = mapped_column(Text, nullable=False)
    period: Mapped[str | None] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="true")
    # Razorpay plans are immutable: created on first subscription, reset on a price change.
    razorpay_plan_id: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = _created()


class Order(Base):
    __tablename__ = "billing_orders"
    __table_args__ = (
        CheckConstraint("status IN ('created', 'paid')", name="status_known"),
        Index("ix_billing_orders_user_created", "user_id", "created_at"),
        Index(
            "ix_billing_orders_unpaid", "created_at", postgresql_where=text("status = 'created'")
        ),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text, nullable=False)
    item_id: Mapped[str] = mapped_column(Text, nullable=False)
    item_name: Mapped[str] = mapped_column(Text, nullable=False)
    credits_milli: Mapped[int] = mapped_column(BigInteger, nullable=False)
    amount_minor: Mapped[int] = mapped_column(BigInteger, nullable=False)
    currency: Mapped[str] = mapped_column(Text, nullable=False)
    # A plan bought as a one-off order grants one period, expiring at its end.
    period: Mapped[str | None] = mapped_column(Text)
    razorpay_order_id: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default="created")
    created_at: Mapped[datetime] = _created()
    paid_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Subscription(Base):
    __tablename__ = "billing_subscriptions"
    __table_args__ = (Index("ix_billing_subscriptions_user", "user_id"),)

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text, nullable=False)
    item_id: Mapped[str] = mapped_column(Text, nullable=False)
    item_name: Mapped[str] = mapped_column(Text, nullable=False)
    credits_milli: Mapped[int] = mapped_column(BigInteger, nullable=False)
    amount_minor: Mapped[int] = mapped_column(BigInteger, nullable=False)
    currency: Mapped[str] = mapped_column(Text, nullable=False)
    period: Mapped[str] = mapped_column(Text, nullable=False)
    razorpay_plan_id: Mapped[str] = mapped_column(Text, nullable=False)
    razorpay_subscription_id: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    # Razorpay's status (created, authenticated, active, halted, cancelled, completed...).
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default="created")
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _created()
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Payment(Base):
    """One Razorpay payment and what it granted (or why it granted nothing)."""

    __tablename__ = "billing_payments"
    __table_args__ = (
        CheckConstraint(
            "status IN ('captured', 'failed', 'refunded', 'partially_refunded', 'rejected',"
            " 'ignored')",
            name="status_known",
        ),
        CheckConstraint("granted_milli >= 0 AND clawed_back_milli >= 0", name="credits_sane"),
        Index("ix_billing_payments_user_created", "user_id", "created_at"),
    )

    razorpay_payment_id: Mapped[str] = mapped_column(Text, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text, nullable=False)
    order_id: Mapped[str | None] = mapped_column(Text)
    subscription_id: Mapped[str | None] = mapped_column(Text)
    item_id: Mapped[str] = mapped_column(Text, nullable=False)
    amount_minor: Mapped[int] = mapped_column(BigInteger, nullable=False)
    currency: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[str] = mapped_column(Text, nullable=False)
    granted_milli: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    grant_transaction_id: Mapped[int | None] = mapped_column(BigInteger)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    period_start: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    period_end: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    refunded_minor: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    # Of what refunds clawed back: taken from the wallet, and recorded as debt.
    clawed_back_milli: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    debt_milli: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _created()
    granted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Refund(Base):
    __tablename__ = "billing_refunds"
    __table_args__ = (Index("ix_billing_refunds_payment", "razorpay_payment_id"),)

    razorpay_refund_id: Mapped[str] = mapped_column(Text, primary_key=True)
    razorpay_payment_id: Mapped[str] = mapped_column(Text, nullable=False)
    amount_minor: Mapped[int] = mapped_column(BigInteger, nullable=False)
    clawback_milli: Mapped[int] = mapped_column(BigInteger, nullable=False)
    taken_milli: Mapped[int] = mapped_column(BigInteger, nullable=False)
    debt_milli: Mapped[int] = mapped_column(BigInteger, nullable=False)
    transaction_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = _created()


class WebhookEvent(Base):
    """Every verified webhook delivery, by `x-razorpay-event-id`: a redelivery is a no-op."""

    __tablename__ = "billing_webhook_events"

    event_id: Mapped[str] = mapped_column(Text, primary_key=True)
    event: Mapped[str] = mapped_column(Text, nullable=False)
    razorpay_payment_id: Mapped[str | None] = mapped_column(Text)
    outcome: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = _created()


class Alert(Base):
    """Something a human must look at (money arrived that we could not match)."""

    __tablename__ = "billing_alerts"
    __table_args__ = (
        UniqueConstraint("kind", "razorpay_payment_id"),
        Index("ix_billing_alerts_created", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    razorpay_payment_id: Mapped[str | None] = mapped_column(Text)
    order_id: Mapped[str | None] = mapped_column(Text)
    user_id: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    created_at: Mapped[datetime] = _created()
