"""Billing's API shapes. Prices and payment amounts are integers in the currency's
minor units (cents), as Razorpay takes them; credits are Ku (`Ku` renders milli-Ku)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from services.kit.money import Ku, PositiveKu
from services.kit.schemas import TextGuard, UserId

ItemId = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$"), TextGuard
]
RazorpayId = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_]+$"), TextGuard
]
Minor = Annotated[int, Field(gt=0, lt=10**12, description="Minor units (cents)")]
USER = "101902121794505144784"


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CatalogItem(BaseModel):
    id: str
    kind: Literal["topup", "plan"]
    name: str
    credits: Ku
    price: int = Field(description="Minor units (cents)")
    currency: str
    period: Literal["month", "year"] | None = Field(description="Plans only: the allowance period")
    active: bool
    updated_at: datetime


class CatalogItemPut(_In):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "kind": "topup",
                    "name": "10 Ku top-up",
                    "credits": 10,
                    "price": 100,
                    "currency": "USD",
                    "period": None,
                    "active": True,
                }
            ]
        },
    )
    kind: Literal["topup", "plan"]
    name: Annotated[str, StringConstraints(min_length=1, max_length=100), TextGuard]
    credits: PositiveKu
    price: Minor
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$"), TextGuard] = "USD"
    period: Literal["month", "year"] | None = None
    active: bool = True


class Catalog(BaseModel):
    items: list[CatalogItem]


class OrderCreate(_In):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"user_id": USER, "item": "topup_25"}]},
    )
    user_id: UserId
    item: ItemId


class Order(BaseModel):
    order_id: str
    razorpay_order_id: str
    user_id: str
    item: str
    credits: Ku
    amount: int = Field(description="Minor units (cents): pass to Razorpay checkout as is")
    currency: str
    key_id: str = Field(description="Razorpay key id for checkout")
    status: str
    created_at: datetime


class VerifyIn(_In):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "razorpay_order_id": "order_NXk2lq8T1AbCdE",
                    "razorpay_payment_id": "pay_NXk3Qm0a9ZyXwV",
                    "razorpay_signature": "9ef4dffbfd84f1318f6739a3ce19f9d8"
                    "5851857ae648f114332d8401e0949a3d",
                }
            ]
        },
    )
    razorpay_order_id: RazorpayId
    razorpay_payment_id: RazorpayId
    razorpay_signature: Annotated[str, StringConstraints(min_length=1, max_length=256), TextGuard]


class Payment(BaseModel):
    payment_id: str
    user_id: str
    order_id: str | None
    subscription_id: str | None
    item: str
    amount: int = Field(description="Paid, in minor units (cents)")
    currency: str
    status: Literal["captured", "failed", "refunded", "partially_refunded", "rejected", "ignored"]
    granted: Ku = Field(description="Credits this payment granted")
    refunded: int = Field(description="Refunded, in minor units")
    clawed_back: Ku = Field(description="Credits taken back by refunds")
    debt: Ku = Field(description="Refunded credits already spent, owed from the next grants")
    expires_at: datetime | None
    period_start: datetime | None
    period_end: datetime | None
    created_at: datetime
    granted_at: datetime | None


class VerifyResult(BaseModel):
    outcome: Literal["granted", "already_granted", "pending", "not_captured", "rejected", "ignored"]
    payment: Payment | None


class PaymentPage(BaseModel):
    items: list[Payment]


class SubscriptionCreate(_In):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"user_id": USER, "item": "pro_monthly"}]},
    )
    user_id: UserId
    item: ItemId


class Subscription(BaseModel):
    subscription_id: str
    razorpay_subscription_id: str
    user_id: str
    item: str
    credits: Ku = Field(description="Granted each period, expiring at the period's end")
    amount: int = Field(description="Per period, in minor units (cents)")
    currency: str
    period: Literal["month", "year"]
    key_id: str
    status: str
    created_at: datetime


class CurrencyRevenue(BaseModel):
    currency: str
    payments: int = Field(description="Payments captured in the month")
    captured: int = Field(description="Their amount, in minor units (cents)")
    refunded: int = Field(description="Refunded of them so far, in minor units")
    net: int = Field(description="captured - refunded, in minor units")


class Revenue(BaseModel):
    month: str = Field(description="YYYY-MM (UTC)", examples=["2026-11"])
    items: list[CurrencyRevenue] = Field(description="One per currency paid in")


class WebhookAck(BaseModel):
    status: Literal["processed", "duplicate", "pending"] = Field(
        description="`pending` (202): a refund whose payment is not known yet; retried by the"
        " reconcile job and by a redelivery"
    )
    event: str
    outcome: str | None


class Alert(BaseModel):
    id: int
    kind: str
    payment_id: str | None
    order_id: str | None
    user_id: str | None
    detail: dict[str, Any]
    created_at: datetime


class AlertPage(BaseModel):
    items: list[Alert]


class ReconcileIn(_In):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"hours": 72}]})
    hours: int | None = Field(
        None, ge=1, le=24 * 90, description="Look back this many hours (default 72)"
    )


class ReconcileResult(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"counts": {"fetched": 3, "granted": 1, "already_granted": 2}}]
        }
    )
    counts: dict[str, int] = Field(
        description="Payments fetched from Razorpay and what became of each (`granted`: "
        "a payment nobody had reported, granted now; `errors`: retried on the next run)"
    )


def item_out(row: dict[str, Any]) -> CatalogItem:
    return CatalogItem(
        id=row["id"],
        kind=row["kind"],
        name=row["name"],
        credits=row["credits_milli"],
        price=row["price_minor"],
        currency=row["currency"],
        period=row["period"],
        active=row["active"],
        updated_at=row["updated_at"],
    )


def payment_out(row: dict[str, Any]) -> Payment:
    return Payment(
        payment_id=row["razorpay_payment_id"],
        user_id=row["user_id"],
        order_id=row["order_id"],
        subscription_id=row["subscription_id"],
        item=row["item_id"],
        amount=row["amount_minor"],
        currency=row["currency"],
        status=row["status"],
        granted=row["granted_milli"],
        refunded=row["refunded_minor"],
        clawed_back=row["clawed_back_milli"],
        debt=row["debt_milli"],
        expires_at=row["expires_at"],
        period_start=row["period_start"],
        period_end=row["period_end"],
        created_at=row["created_at"],
        granted_at=row["granted_at"],
    )
