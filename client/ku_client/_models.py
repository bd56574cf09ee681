"""What the API returns, typed. Amounts are integers of milli-Ku (1 Ku = 1000), read
exactly from the JSON's decimal text; fields a newer server adds are kept in `raw`."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Generic, TypeVar

T = TypeVar("T")

MILLI_PER_KU = 1000


def to_milli(value: Any) -> int:
    """A Ku number from the API (parsed as Decimal) to integer milli-Ku, exactly."""
    milli = Decimal(str(value)) * MILLI_PER_KU
    if milli != milli.to_integral_value():
        raise ValueError(f"not a whole number of milli-Ku: {value!r}")
    return int(milli)


def to_ku(milli: int) -> int | float:
    """Integer milli-Ku as the JSON number the API takes. A float only carries the value:
    a <=3-decimal float's repr is its exact decimal text, which is what the server reads."""
    if isinstance(milli, bool) or not isinstance(milli, int):
        raise TypeError("amounts are integer milli-Ku")
    if milli % MILLI_PER_KU == 0:
        return milli // MILLI_PER_KU
    return float(Decimal(milli).scaleb(-3))


def _milli(data: dict[str, Any], name: str) -> int:
    value = data.get(name)
    return to_milli(value) if value is not None else 0


def _time(value: Any) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


@dataclass(frozen=True)
class Balance:
    user_id: str
    available_milli: int
    held_milli: int
    total_milli: int
    by_source: dict[str, int]
    next_expiry_at: datetime | None
    next_expiry_milli: int
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def parse(cls, d: dict[str, Any]) -> Balance:
        expiry = d.get("next_expiry") or {}
        return cls(
            user_id=d["user_id"],
            available_milli=_milli(d, "available"),
            held_milli=_milli(d, "held"),
            total_milli=_milli(d, "total"),
            by_source={s["source"]: _milli(s, "available") for s in d.get("by_source", [])},
            next_expiry_at=_time(expiry.get("at")),
            next_expiry_milli=_milli(expiry, "amount"),
            raw=d,
        )


@dataclass(frozen=True)
class Hold:
    id: str
    user_id: str
    app: str
    amount_milli: int
    captured_milli: int
    status: str
    reference: str | None
    expires_at: datetime | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def parse(cls, d: dict[str, Any]) -> Hold:
        return cls(
            id=d["id"],
            user_id=d["user_id"],
            app=d["app"],
            amount_milli=_milli(d, "amount"),
            captured_milli=_milli(d, "captured"),
            status=d["status"],
            reference=d.get("reference"),
            expires_at=_time(d.get("expires_at")),
            raw=d,
        )


@dataclass(frozen=True)
class HoldResult:
    hold: Hold
    transaction_id: int | None
    available_milli: int
    held_milli: int
    replayed: bool
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def parse(cls, d: dict[str, Any], replayed: bool = False) -> HoldResult:
        return cls(
            hold=Hold.parse(d["hold"]),
            transaction_id=d.get("transaction_id"),
            available_milli=_milli(d, "available"),
            held_milli=_milli(d, "held"),
            replayed=replayed,
            raw=d,
        )


@dataclass(frozen=True)
class Charge:
    """A debit, grant or refund: the transaction and the user's balance after it."""

    transaction_id: int
    user_id: str
    amount_milli: int
    available_milli: int
    held_milli: int
    replayed: bool
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def parse(cls, d: dict[str, Any], replayed: bool = False) -> Charge:
        return cls(
            transaction_id=int(d["transaction_id"]),
            user_id=d["user_id"],
            amount_milli=_milli(d, "amount"),
            available_milli=_milli(d, "available"),
            held_milli=_milli(d, "held"),
            replayed=replayed,
            raw=d,
        )


@dataclass(frozen=True)
class Transaction:
    id: int
    kind: str
    user_id: str
    app: str | None
    amount_milli: int
    delta_milli: int
    description: str | None
    reference: str | None
    created_at: datetime | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def parse(cls, d: dict[str, Any]) -> Transaction:
        return cls(
            id=int(d["id"]),
            kind=d["kind"],
            user_id=d["user_id"],
            app=d.get("app"),
            amount_milli=_milli(d, "amount"),
            delta_milli=_milli(d, "delta"),
            description=d.get("description"),
            reference=d.get("reference"),
            created_at=_time(d.get("created_at")),
            raw=d,
        )


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


@dataclass(frozen=True)
class Project:
    code: str
    user_id: str
    app_source: str
    project_type: str
    title: str
    content_type: str
    size_bytes: int
    metadata: dict[str, Any]
    content: str | None
    content_encoding: str | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def parse(cls, d: dict[str, Any]) -> Project:
        return cls(
            code=d["code"],
            user_id=d["user_id"],
            app_source=d["app_source"],
            project_type=d["project_type"],
            title=d["title"],
            content_type=d["content_type"],
            size_bytes=int(d["size_bytes"]),
            metadata=d.get("metadata") or {},
            content=d.get("content"),
            content_encoding=d.get("content_encoding"),
            raw=d,
        )


@dataclass(frozen=True)
class Event:
    """One server-sent event from `/v1/events` (`credits.changed`: amounts in Ku)."""

    id: str | None
    event: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Model:
    """A model of the generation catalog, with its price."""

    id: str
    name: str
    provider: str
    price_per_100_words_milli: int
    max_words: int
    fallback: list[str]
    offline: bool
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def parse(cls, d: dict[str, Any]) -> Model:
        return cls(
            id=d["id"],
            name=d["name"],
            provider=d["owned_by"],
            price_per_100_words_milli=_milli(d, "price_per_100_words"),
            max_words=int(d["max_words"]),
            fallback=list(d.get("fallback") or []),
            offline=bool(d.get("offline")),
            raw=d,
        )


@dataclass(frozen=True)
class Estimate:
    """The most a generation can cost: `cost_milli` at the model's price, `max_cost_milli`
    what is held (the dearest model of its fallback chain)."""

    model: str
    max_words: int
    cost_milli: int
    max_cost_milli: int
    words_rule: str
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def parse(cls, d: dict[str, Any]) -> Estimate:
        return cls(
            model=d["model"],
            max_words=int(d["max_words"]),
            cost_milli=_milli(d, "cost"),
            max_cost_milli=_milli(d, "max_cost"),
            words_rule=d.get("words_rule", ""),
            raw=d,
        )


@dataclass(frozen=True)
class Generation:
    """A finished generation: the text, its words and what it cost."""

    id: str
    status: str
    model: str
    served_model: str
    provider: str | None
    offline: bool
    text: str
    words: int
    cost_milli: int
    held_milli: int
    finish_reason: str
    project_code: str | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def parse(cls, d: dict[str, Any]) -> Generation:
        return cls(
            id=d["id"],
            status=d["status"],
            model=d["model"],
            served_model=d["served_model"],
            provider=d.get("provider"),
            offline=bool(d.get("offline")),
            text=d["text"],
            words=int(d["words"]),
            cost_milli=_milli(d, "cost"),
            held_milli=_milli(d, "held"),
            finish_reason=d["finish_reason"],
            project_code=d.get("project_code"),
            raw=d,
        )


@dataclass(frozen=True)
class EnhancementTask:
    """An image enhancement task: `status` pending, processing, completed or failed."""

    id: str
    user_id: str
    app: str
    status: str
    progress: int
    enhancement_type: str
    price_milli: int
    charged_milli: int
    settled: bool
    provider: str | None
    degraded: bool
    result_url: str | None
    project_code: str | None
    error_code: str | None
    created_at: datetime | None
    completed_at: datetime | None
    replayed: bool
    raw: dict[str, Any] = field(repr=False)

    @property
    def done(self) -> bool:
        return self.status in ("completed", "failed")

    @classmethod
    def parse(cls, d: dict[str, Any], replayed: bool = False) -> EnhancementTask:
        error = d.get("error") or {}
        return cls(
            id=d["id"],
            user_id=d["user_id"],
            app=d["app"],
            status=d["status"],
            progress=int(d.get("progress") or 0),
            enhancement_type=d["enhancement_type"],
            price_milli=_milli(d, "price"),
            charged_milli=_milli(d, "charged"),
            settled=bool(d.get("settled")),
            provider=d.get("provider"),
            degraded=bool(d.get("degraded")),
            result_url=d.get("result_url"),
            project_code=d.get("project_code"),
            error_code=error.get("code"),
            created_at=_time(d.get("created_at")),
            completed_at=_time(d.get("completed_at")),
            replayed=replayed,
            raw=d,
        )
