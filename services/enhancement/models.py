"""Enhancement tables (schema `enhancement`).

Invariants:
- a task's money is settled once: `hold_id` (Ku) or `allowance_period` (an included
  enhancement, drawn from the month's allowance in the ledger with the reference
  `enhancement:<task id>`) is taken at submit, and `settled_at` is set after the
  ledger's capture or release (confirmation or return of the draw); the ledger's own
  idempotency (by hold id, by the draw's reference) makes a repeated settlement
  harmless.
- `attempt` is a fencing token: a worker whose lease ran out cannot write over the
  work of the worker that took the task after it.
- a pool never goes negative (CHECK), and each (provider, reference) moves a pool
  at most once (`pool_entries` primary key): consumption and refills are idempotent.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    Index,
    Integer,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.kit.bus import processed_events_table
from services.kit.db import schema_metadata
from services.kit.idempotency import idempotency_table
from services.kit.outbox import outbox_table

SCHEMA = "enhancement"


class Base(DeclarativeBase):
    metadata = schema_metadata(SCHEMA)


outbox = outbox_table(Base.metadata)
processed_events = processed_events_table(Base.metadata)
idempotency_keys = idempotency_table(Base.metadata)

_NOW = func.now()


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'processing', 'completed', 'failed')", name="status_known"
        ),
        CheckConstraint("strength >= 0 AND strength <= 1", name="strength_range"),
        CheckConstraint("price_milli >= 0 AND charged_milli >= 0", name="money_not_negative"),
        Index("ix_tasks_user_created", "user_id", "created_at"),
        Index(
            "ix_tasks_open",
            "status",
            "lease_until",
            postgresql_where="status IN ('pending', 'processing')",
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    user_id: Mapped[str] = mapped_column(Text, nullable=False)
    app: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default="pending")
    progress: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    enhancement_type: Mapped[str] = mapped_column(Text, nullable=False)
    prompt: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    strength: Mapped[float] = mapped_column(Float, nullable=False)
    moodboard_id: Mapped[str | None] = mapped_column(Text)
    input_source: Mapped[str] = mapped_column(Text, nullable=False)  # url | upload | project
    input_url: Mapped[str | None] = mapped_column(Text)
    input_key: Mapped[str] = mapped_column(Text, nullable=False)
    input_content_type: Mapped[str] = mapped_column(Text, nullable=False)
    input_width: Mapped[int] = mapped_column(Integer, nullable=False)
    input_height: Mapped[int] = mapped_column(Integer, nullable=False)
    # Hash of the submitted request: a replayed Idempotency-Key with other input is 409.
    request_hash: Mapped[str | None] = mapped_column(Text)
    save_to_workspace: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="f")
    # Money: the Ku price held at submit (0 when an included enhancement paid for it).
    price_milli: Mapped[int] = mapped_column(BigInteger, nullable=False)
    hold_id: Mapped[str | None] = mapped_column(Text)
    allowance_period: Mapped[str | None] = mapped_column(Text)
    charged_milli: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    settled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Work.
    provider: Mapped[str | None] = mapped_column(Text)
    provider_task_id: Mapped[str | None] = mapped_column(Text)
    provider_cost_milli: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    tried: Mapped[list[Any]] = mapped_column(JSONB, nullable=False, server_default="[]")
    degraded: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="f")
    attempt: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    deadline_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    result_key: Mapped[str | None] = mapped_column(Text)
    result_content_type: Mapped[str | None] = mapped_column(Text)
    result_deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    project_code: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(Text)
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=_NOW
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=_NOW
    )
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Pool(Base):
    """What the platform pre-bought from one provider, in milli provider credits."""

    __tablename__ = "pools"
    __table_args__ = (
        CheckConstraint("balance_milli >= 0", name="balance_not_negative"),
        CheckConstraint("level_milli >= 0", name="level_not_negative"),
    )

    provider: Mapped[str] = mapped_column(Text, primary_key=True)
    balance_milli: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    # The balance right after the last refill: the base of the "below 20 %" rule.
    level_milli: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    consumed_milli: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    # Set when the low alert fired; cleared by a refill above the threshold (one per crossing).
    low_alerted: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="f")
    # Set when the provider-unhealthy alert fired for its breaker opening; cleared when the
    # breaker is seen closed again (one alert per crossing, however long it stays open).
    unhealthy_alerted: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="f")
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=_NOW
    )


class PoolEntry(Base):
    __tablename__ = "pool_entries"
    __table_args__ = (CheckConstraint("kind IN ('consume', 'refill')", name="kind_known"),)

    provider: Mapped[str] = mapped_column(Text, primary_key=True)
    reference: Mapped[str] = mapped_column(Text, primary_key=True)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    amount_milli: Mapped[int] = mapped_column(BigInteger, nullable=False)
    task_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=_NOW
    )


class Alert(Base):
    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    subject: Mapped[str] = mapped_column(Text, nullable=False)
    message: Mapped[str] = mapped_column(Text, nullable=False)
    detail: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default="{}")
    # Natural key of the crossing (e.g. "pool_low:fal:3"): one alert per crossing.
    dedupe_key: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=_NOW
    )


class Tier(Base):
    """A user's tier set by an admin (`PUT /tiers/{user}`): a floor under the tiers of
    the user's paid plans (`subscriptions`); free unless set."""

    __tablename__ = "tiers"

    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    tier: Mapped[str] = mapped_column(Text, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=_NOW
    )


class Subscription(Base):
    """A billing plan of a user, as billing's `billing.subscription.changed` events tell
    it: its tier (`KU_ENHANCEMENT_PLAN_TIERS[item]`) counts while `status` is active and
    `expires_at` (the end of the paid period) is ahead. Cancelled is final."""

    __tablename__ = "subscriptions"
    __table_args__ = (
        CheckConstraint("status IN ('active', 'cancelled')", name="status_known"),
        Index("ix_subscriptions_user", "user_id"),
    )

    subscription_id: Mapped[str] = mapped_column(Text, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text, nullable=False)
    item: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[str] = mapped_column(Text, nullable=False)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=_NOW
    )


class DailySummary(Base):
    __tablename__ = "daily_summaries"

    day: Mapped[str] = mapped_column(Text, primary_key=True)
    summary: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=_NOW
    )


metadata = Base.metadata
