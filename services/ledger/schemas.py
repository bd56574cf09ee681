from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from services.kit.money import Ku, PositiveKu
from services.kit.schemas import AppName, Description, Reference, TextGuard, UserId

GrantSource = Literal[
    "welcome", "purchase", "subscription", "promo", "refund", "admin", "compensation"
]
TransactionKind = Literal[
    "grant",
    "debit",
    "reserve",
    "capture",
    "release",
    "hold_expiry",
    "grant_expiry",
    "refund",
    "clawback",
]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Why an admin moves money (required from admins, recorded in ledger.audit_log).
Reason = Annotated[str, StringConstraints(min_length=1, max_length=500), TextGuard]
ReasonField = Field(None, description="Why (required when an admin moves money; audited)")


class SourceBalance(BaseModel):
    source: str
    available: Ku


class NextExpiry(BaseModel):
    at: datetime
    amount: Ku


class Balance(BaseModel):
    user_id: str
    available: Ku = Field(description="Spendable now")
    held: Ku = Field(description="Reserved by active holds")
    debt: Ku = Field(
        description="Clawed-back credit already spent; while it is above 0 nothing is "
        "spendable, and every credit that comes back settles it first"
    )
    total: Ku = Field(description="available + held")
    by_source: list[SourceBalance]
    next_expiry: NextExpiry | None


class AccountCreate(_In):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"user_id": "101902121794505144784", "welcome": True}]},
    )
    user_id: UserId
    welcome: bool = Field(True, description="Grant the welcome credits (once per user)")
    initial_credits: PositiveKu | None = Field(
        None,
        description="Admin only: grant this instead of the welcome credits (one grant per user)",
    )
    reason: Reason | None = ReasonField


class Account(BaseModel):
    user_id: str
    created: bool
    available: Ku | None = None
    held: Ku | None = None


class GrantCreate(_In):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "user_id": "101902121794505144784",
                    "amount": 25,
                    "source": "purchase",
                    "reference": "pay_NXk2lq8T1",
                }
            ]
        },
    )
    user_id: UserId
    amount: PositiveKu
    source: GrantSource
    expires_at: datetime | None = None
    priority: int = Field(0, ge=-100, le=100)
    reference: Reference | None = None
    description: Description | None = None
    reason: Reason | None = ReasonField


class Grant(BaseModel):
    grant_id: int
    transaction_id: int
    user_id: str
    source: str
    amount: Ku
    expires_at: datetime | None
    reference: str | None
    created_at: datetime
    available: Ku
    held: Ku


class DebitCreate(_In):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "user_id": "101902121794505144784",
                    "amount": 5,
                    "app": "imagegene",
                    "description": "AI image generation - 1024x1024",
                    "reference": "IMG123",
                }
            ]
        },
    )
    user_id: UserId
    amount: PositiveKu
    app: AppName | None = Field(
        None, description="Defaults to the calling app; another app's name is 403 (admins excepted)"
    )
    description: Description | None = None
    reference: Reference | None = Field(
        None, description="Natural idempotency key, e.g. a project code"
    )
    reason: Reason | None = ReasonField


class Debit(BaseModel):
    transaction_id: int
    user_id: str
    app: str
    amount: Ku
    description: str | None
    reference: str | None
    created_at: datetime
    available: Ku
    held: Ku


class HoldCreate(_In):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "user_id": "101902121794505144784",
                    "amount": 12.5,
                    "app": "penora",
                    "ttl_seconds": 300,
                    "reference": "gen_7f3a",
                }
            ]
        },
    )
    user_id: UserId
    amount: PositiveKu
    app: AppName | None = None
    ttl_seconds: int = Field(900, ge=1, le=86_400)
    reference: Reference | None = None
    description: Description | None = None
    reason: Reason | None = ReasonField


class CaptureIn(_In):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"amount": 7.25}]},
    )
    amount: PositiveKu | None = Field(None, description="At most the held amount; default all")
    reason: Reason | None = ReasonField


class ReleaseIn(_In):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{}]},
    )
    reason: Reason | None = ReasonField


class HoldOut(BaseModel):
    id: str
    user_id: str
    app: str
    owner: str = Field(description="Who placed the hold; only its owner may resolve it")
    amount: Ku
    captured: Ku
    clawed: Ku = Field(description="Taken back by a clawback of credit the hold drew from")
    status: Literal["active", "captured", "released", "expired", "clawed"]
    reference: str | None
    description: str | None
    expires_at: datetime
    created_at: datetime
    resolved_at: datetime | None


class HoldResult(BaseModel):
    hold: HoldOut
    transaction_id: int | None
    available: Ku
    held: Ku


class RefundCreate(_In):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "transaction_id": 48213,
                    "amount": 2.5,
                    "reference": "refund-IMG123",
                    "description": "Image generation failed",
                }
            ]
        },
    )
    transaction_id: int = Field(gt=0)
    amount: PositiveKu | None = Field(None, description="Default: all that is left to refund")
    reference: Reference | None = None
    description: Description | None = None
    reason: Reason | None = ReasonField


class Refund(BaseModel):
    transaction_id: int
    refund_of: int
    user_id: str
    app: str | None
    amount: Ku
    refundable: Ku = Field(description="What is still refundable on the original charge")
    returned: Ku = Field(description="Back to the lots the charge drew from, spendable")
    debt_settled: Ku = Field(description="Used to settle the user's debt first")
    expired: Ku = Field(description="Back to lots that have expired meanwhile: not spendable")
    created_at: datetime
    available: Ku
    held: Ku


class TransactionOut(BaseModel):
    id: int
    kind: str
    user_id: str
    app: str | None
    source: str | None
    amount: Ku
    delta: Ku = Field(description="Effect on spendable credit")
    description: str | None
    reference: str | None
    hold_id: str | None
    refund_of: int | None
    created_at: datetime


class TransactionPage(BaseModel):
    items: list[TransactionOut]
    next_cursor: str | None


class UsageRow(BaseModel):
    app: str | None = None
    day: str | None = None
    spent: Ku
    charges: int


class Usage(BaseModel):
    user_id: str
    group_by: list[str]
    rows: list[UsageRow]
    total_spent: Ku


# --- POST /v1/ledger/batch -------------------------------------------------------------

BATCH_MAX_ITEMS = 1000
ItemKey = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200),
    TextGuard,
    Field(description="This item's idempotency key, as the single route's Idempotency-Key"),
]
HoldId = Annotated[str, StringConstraints(min_length=1, max_length=64), TextGuard]
_ITEM = ConfigDict(extra="forbid")


class DebitItem(DebitCreate):
    model_config = _ITEM
    op: Literal["debit"]
    idempotency_key: ItemKey


class HoldItem(HoldCreate):
    model_config = _ITEM
    op: Literal["hold"]
    idempotency_key: ItemKey


class CaptureItem(CaptureIn):
    model_config = _ITEM
    op: Literal["capture"]
    hold_id: HoldId
    idempotency_key: ItemKey


class ReleaseItem(ReleaseIn):
    model_config = _ITEM
    op: Literal["release"]
    hold_id: HoldId
    idempotency_key: ItemKey


class GrantItem(GrantCreate):
    model_config = _ITEM
    op: Literal["grant"]
    idempotency_key: ItemKey


class RefundItem(RefundCreate):
    model_config = _ITEM
    op: Literal["refund"]
    idempotency_key: ItemKey


BatchItem = Annotated[
    DebitItem | HoldItem | CaptureItem | ReleaseItem | GrantItem | RefundItem,
    Field(discriminator="op"),
]


class BatchIn(_In):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "operations": [
                        {
                            "op": "debit",
                            "idempotency_key": "usage-2026-11-25-0001",
                            "user_id": "101902121794505144784",
                            "amount": 0.25,
                            "description": "1,250 tokens",
                        },
                        {
                            "op": "hold",
                            "idempotency_key": "gen_7f3a-hold",
                            "user_id": "117288341799934211024",
                            "amount": 12.5,
                            "ttl_seconds": 300,
                        },
                        {
                            "op": "capture",
                            "idempotency_key": "gen_6e21-capture",
                            "hold_id": "5b0c7a1e-9f0e-4c1a-a3b8-6d2f1f7e2c10",
                            "amount": 3,
                        },
                    ]
                }
            ]
        },
    )
    operations: list[BatchItem] = Field(min_length=1, max_length=BATCH_MAX_ITEMS)


class BatchError(BaseModel):
    code: str
    message: str
    detail: dict[str, Any] | None = None


class BatchResult(BaseModel):
    index: int = Field(description="The item's position in the request")
    op: str
    status: int = Field(description="What the single route would have answered")
    replayed: bool = Field(description="This item's key was seen before: its first outcome")
    body: dict[str, Any] | None = Field(
        None, description="On success: the single route's response body"
    )
    error: BatchError | None = Field(None, description="On failure: the single route's error")


class BatchOut(BaseModel):
    results: list[BatchResult]
    succeeded: int
    failed: int
