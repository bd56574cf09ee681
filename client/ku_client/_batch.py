"""Batches: many ledger operations in one request (`POST /v1/ledger/batch`).

    from ku_client import BatchItem

    result = ku.batch([
        BatchItem.debit(user_a, 250, description="1,250 tokens"),
        BatchItem.hold(user_b, 12_500, ttl_seconds=300),
        BatchItem.capture(hold_id, 3_000),
    ])
    for item in result.items:
        if item.error is not None:   # a typed KuError: InsufficientCredits, Conflict, ...
            ...

Each item carries its own idempotency key (generated once when the item is made, or
yours): the same key in a single call and in a batch item is one request. The batch
itself is sent with an Idempotency-Key too, so a retried batch replays its first answer.
One item's failure never fails the others; the items are applied in no particular order
(a capture of a hold placed in the same batch may run first: send it in a later batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ku_client._core import new_idempotency_key
from ku_client._exceptions import KuError, error_for
from ku_client._models import Charge, HoldResult, to_ku

# The server's limit per request (docs/ledger.md "Batches").
BATCH_MAX_ITEMS = 1000


@dataclass(frozen=True)
class BatchItem:
    """One operation of a batch: what its single call takes, plus its idempotency key."""

    op: str
    idempotency_key: str
    body: dict[str, Any] = field(default_factory=dict)

    def wire(self) -> dict[str, Any]:
        fields = {k: v for k, v in self.body.items() if v is not None}
        return {"op": self.op, "idempotency_key": self.idempotency_key, **fields}

    @classmethod
    def _make(cls, op: str, key: str | None, **body: Any) -> BatchItem:
        return cls(op, key or new_idempotency_key(), body)

    @classmethod
    def debit(
        cls,
        user_id: str,
        amount_milli: int,
        *,
        app: str | None = None,
        description: str | None = None,
        reference: str | None = None,
        idempotency_key: str | None = None,
    ) -> BatchItem:
        return cls._make(
            "debit",
            idempotency_key,
            user_id=user_id,
            amount=to_ku(amount_milli),
            app=app,
            description=description,
            reference=reference,
        )

    @classmethod
    def hold(
        cls,
        user_id: str,
        amount_milli: int,
        *,
        app: str | None = None,
        ttl_seconds: int | None = None,
        reference: str | None = None,
        description: str | None = None,
        idempotency_key: str | None = None,
    ) -> BatchItem:
        return cls._make(
            "hold",
            idempotency_key,
            user_id=user_id,
            amount=to_ku(amount_milli),
            app=app,
            ttl_seconds=ttl_seconds,
            reference=reference,
            description=description,
        )

    @classmethod
    def capture(
        cls, hold_id: str, amount_milli: int | None = None, *, idempotency_key: str | None = None
    ) -> BatchItem:
        amount = to_ku(amount_milli) if amount_milli is not None else None
        return cls._make("capture", idempotency_key, hold_id=hold_id, amount=amount)

    @classmethod
    def release(cls, hold_id: str, *, idempotency_key: str | None = None) -> BatchItem:
        return cls._make("release", idempotency_key, hold_id=hold_id)

    @classmethod
    def grant(
        cls,
        user_id: str,
        amount_milli: int,
        source: str,
        *,
        expires_at: datetime | None = None,
        priority: int | None = None,
        reference: str | None = None,
        description: str | None = None,
        reason: str | None = None,
        idempotency_key: str | None = None,
    ) -> BatchItem:
        return cls._make(
            "grant",
            idempotency_key,
            user_id=user_id,
            amount=to_ku(amount_milli),
            source=source,
            expires_at=expires_at.isoformat() if expires_at else None,
            priority=priority,
            reference=reference,
            description=description,
            reason=reason,
        )

    @classmethod
    def refund(
        cls,
        transaction_id: int,
        amount_milli: int | None = None,
        *,
        reference: str | None = None,
        description: str | None = None,
        idempotency_key: str | None = None,
    ) -> BatchItem:
        amount = to_ku(amount_milli) if amount_milli is not None else None
        return cls._make(
            "refund",
            idempotency_key,
            transaction_id=transaction_id,
            amount=amount,
            reference=reference,
            description=description,
        )


@dataclass(frozen=True)
class BatchItemResult:
    """One item's outcome: what its single call would have answered. `value` is a
    `Charge` (debit, grant, refund) or a `HoldResult` (hold, capture, release) on
    success; `error` the typed `KuError` its single call would have raised."""

    index: int
    op: str
    status: int
    replayed: bool
    value: Charge | HoldResult | None
    error: KuError | None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def parse(cls, d: dict[str, Any], request_id: str | None) -> BatchItemResult:
        status = int(d["status"])
        replayed = bool(d.get("replayed"))
        value: Charge | HoldResult | None = None
        error: KuError | None = None
        if status >= 400:
            error = error_for(status, {"error": d.get("error")}, request_id, None)
        elif d["op"] in ("hold", "capture", "release"):
            value = HoldResult.parse(d["body"], replayed)
        else:
            value = Charge.parse(d["body"], replayed)
        return cls(int(d["index"]), d["op"], status, replayed, value, error)


@dataclass(frozen=True)
class BatchResult:
    """Every item's result, in the order sent. `replayed`: the whole batch was answered
    before under its key (a retry)."""

    items: list[BatchItemResult]
    succeeded: int
    failed: int
    replayed: bool

    @classmethod
    def parse(cls, d: dict[str, Any], replayed: bool, request_id: str | None) -> BatchResult:
        items = [BatchItemResult.parse(r, request_id) for r in d["results"]]
        return cls(items, int(d["succeeded"]), int(d["failed"]), replayed)
