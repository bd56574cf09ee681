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


# --- allowances: units (e.g. included enhancements), not Ku (docs/ledger.md "Allowances")

Period = Annotated[
    str,
    StringConstraints(pattern=r"^2[0-9]{3}-(0[1-9]|1[0-2])$"),
    TextGuard,
    Field(description="A calendar month, UTC: 'YYYY-MM'", examples=["2026-11"]),
]
AllowanceKind = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$"),
    TextGuard,
    Field(description="What the units are of, e.g. `enhancement`", examples=["enhancement"]),
]
DrawReference = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9:._-]{1,200}$"),
    TextGuard,
    Field(description="What the unit is for, once per reference, ever: the draw's natural key"),
]


class AllowanceGrantIn(_In):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "user_id": "101902121794505144784",
                    "kind": "enhancement",
                    "period": "2026-11",
                    "units": 10,
                    "reference": "tier:plus",
                }
            ]
        },
    )
    user_id: UserId
    kind: AllowanceKind
    period: Period
    units: int = Field(
        ge=1, le=1_000_000, description="The allowance is at least this many units afterwards"
    )
    reference: Reference | None = Field(None, description="Recorded on the grant's entry")


class AllowanceDrawIn(_In):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "user_id": "101902121794505144784",
                    "kind": "enhancement",
                    "period": "2026-11",
                    "reference": "enhancement:6f1c0d2e-4b7a-4f3e-9a51-2d8c7b1e0f43",
                    "ttl_seconds": 3600,
                    "cap": 10,
                }
            ]
        },
    )
    user_id: UserId
    kind: AllowanceKind
    period: Period
    reference: DrawReference
    ttl_seconds: int = Field(
        3600,
        ge=1,
        le=86_400,
        description="Unconfirmed past this, the draw expires and its unit comes back",
    )
    cap: int | None = Field(
        None,
        ge=0,
        description="Draw only while fewer than this many are used (the caller's current "
        "entitlement, e.g. after a downgrade); the grant still bounds it",
    )


class AllowanceState(BaseModel):
    user_id: str
    kind: str
    period: str
    granted: int = Field(description="Units granted for the period")
    used: int = Field(description="Units drawn and not given back (active or confirmed)")
    remaining: int = Field(description="granted - used; 0 once the period has ended")
    expires_at: datetime = Field(description="The period's end: nothing is drawn after it")
    expired: bool


class AllowanceGrantOut(BaseModel):
    allowance: AllowanceState
    increased_by: int = Field(description="Units added by this request (0: already granted)")


class AllowanceDrawOut(BaseModel):
    reference: str
    user_id: str
    kind: str
    period: str
    owner: str
    status: Literal["active", "confirmed", "returned", "expired"]
    expires_at: datetime = Field(description="An active draw past this expires (its TTL)")
    created_at: datetime
    resolved_at: datetime | None = None


class AllowanceDrawResult(BaseModel):
    draw: AllowanceDrawOut
    allowance: AllowanceState
    given_back: bool | None = Field(
        None,
        description="Return: whether this request gave the unit back (false on a replay, "
        "or after the period ended)",
    )


class AllowanceList(BaseModel):
    user_id: str
    period: str
    items: list[AllowanceState]
