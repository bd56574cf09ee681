"""Ledger tables (schema `ledger`).

Invariants (checked by `ku ledger verify`, enforced by the functions in `sql/`, the
newest definition of each in the highest-numbered file):
- every journal transaction's postings sum to zero;
- a wallet's `balance_milli` equals the sum of its grants' `remaining_milli` and of
  its `wallet` postings; its `held_milli` equals its active holds and its `held`
  postings; none of these is ever negative;
- a hold resolves (capture, release, expiry or a full clawback) exactly once;
- per lot: amount = remaining + drawn - returned + active held + expired + clawed
  + settled + legacy;
- journal rows (`transactions`, `postings`) are append-only.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Computed,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    PrimaryKeyConstraint,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.kit.bus import processed_events_table
from services.kit.db import schema_metadata
from services.kit.idempotency import idempotency_table
from services.kit.outbox import outbox_table

SCHEMA = "ledger"


class Base(DeclarativeBase):
    metadata = schema_metadata(SCHEMA)


outbox = outbox_table(Base.metadata)
processed_events = processed_events_table(Base.metadata)
idempotency_keys = idempotency_table(Base.metadata)


class Wallet(Base):
    __tablename__ = "wallets"
    __table_args__ = (
        CheckConstraint("balance_milli >= 0", name="balance_not_negative"),
        CheckConstraint("held_milli >= 0", name="held_not_negative"),
        CheckConstraint("debt_milli >= 0", name="debt_not_negative"),
    )

    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    # Sum of grants' remaining (including expired credit the expiry job has not swept).
    balance_milli: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    held_milli: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    # Clawed-back credit the user had already spent (billing refunds); the next grant
    # settles it first. Mirrors the negated sum of the user's `debt` postings.
    debt_milli: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class Grant(Base):
    __tablename__ = "grants"
    __table_args__ = (
        CheckConstraint("amount_milli > 0", name="amount_positive"),
        CheckConstraint(
            "remaining_milli >= 0 AND remaining_milli <= amount_milli", name="remaining_in_range"
        ),
        # On `spendable`, not `remaining_milli > 0`: an index naming remaining_milli would
        # make every draw's UPDATE write an entry in each index (no HOT update).
        Index("ix_grants_spendable", "user_id", "expires_at", postgresql_where=text("spendable")),
        Index("ix_grants_expiring", "expires_at", postgresql_where=text("spendable")),
        {"postgresql_with": {"fillfactor": "80"}},
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[str] = mapped_column(
        Text, ForeignKey(f"{SCHEMA}.wallets.user_id"), nullable=False
    )
    source: Mapped[str] = mapped_column(Text, nullable=False)
    amount_milli: Mapped[int] = mapped_column(BigInteger, nullable=False)
    remaining_milli: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # remaining_milli > 0, kept by Postgres: changes only when the lot runs out or fills.
    spendable: Mapped[bool] = mapped_column(
        Boolean, Computed("remaining_milli > 0", persisted=True), nullable=False
    )
    priority: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    reference: Mapped[str | None] = mapped_column(Text)
    tx_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # Where the lot's credit went besides remaining, draws and holds (per-lot records):
    # expired, taken by clawbacks, used to settle debt, and (lots older than migration
    # 0004) given out before per-lot records existed.
    expired_milli: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    clawed_milli: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    settled_milli: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    legacy_milli: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class Hold(Base):
    __tablename__ = "holds"
    __table_args__ = (
        CheckConstraint("amount_milli > 0", name="amount_positive"),
        CheckConstraint(
            "captured_milli >= 0 AND clawed_milli >= 0"
            " AND captured_milli + clawed_milli <= amount_milli",
            name="captured_in_range",
        ),
        CheckConstraint(
            "status IN ('active', 'captured', 'released', 'expired', 'clawed')",
            name="status_known",
        ),
        Index("ix_holds_user_active", "user_id", postgresql_where=text("status = 'active'")),
        Index("ix_holds_expiring", "expires_at", postgresql_where=text("status = 'active'")),
    )

    id: Mapped[str] = mapped_column(UUID(as_uuid=False), primary_key=True)
    user_id: Mapped[str] = mapped_column(
        Text, ForeignKey(f"{SCHEMA}.wallets.user_id"), nullable=False
    )
    app: Mapped[str] = mapped_column(Text, nullable=False)
    # Who placed it ("app:penora", "service:generation", ...): only its owner (or an
    # authority over every hold) may capture or release it.
    owner: Mapped[str] = mapped_column(Text, nullable=False)
    amount_milli: Mapped[int] = mapped_column(BigInteger, nullable=False)
    captured_milli: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    # Taken by clawbacks of a lot it drew from; amount - clawed is what it still holds.
    clawed_milli: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default="active")
    reference: Mapped[str | None] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    reserve_tx_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    resolve_tx_id: Mapped[int | None] = mapped_column(BigInteger)


class HoldAllocation(Base):
    """Which grants a hold drew from, so a release gives credit back where it came from."""

    __tablename__ = "hold_allocations"
    __table_args__ = (Index("ix_hold_allocations_grant", "grant_id"),)

    hold_id: Mapped[str] = mapped_column(
        UUID(as_uuid=False), ForeignKey(f"{SCHEMA}.holds.id"), primary_key=True
    )
    grant_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey(f"{SCHEMA}.grants.id"), primary_key=True
    )
    amount_milli: Mapped[int] = mapped_column(BigInteger, nullable=False)


class Draw(Base):
    """Which lots a charge (debit or capture) spent, one row per lot, so a refund gives
    credit back where it came from; `returned_milli` is what refunds gave back."""

    __tablename__ = "draws"
    __table_args__ = (
        CheckConstraint(
            "amount_milli > 0 AND returned_milli >= 0 AND returned_milli <= amount_milli",
            name="returned_in_range",
        ),
    )

    # No foreign keys: written only by the ledger's functions next to the charge and the
    # lot they name; `ku ledger verify` checks the links (`records_linked`).
    tx_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    grant_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    amount_milli: Mapped[int] = mapped_column(BigInteger, nullable=False)
    returned_milli: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")


class AppLink(Base):
    """A user linked to an app (signed in through its SSO, or linked by an admin): a
    partner key with authority `linked:<app>` may act only for these users."""

    __tablename__ = "app_links"

    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    app: Mapped[str] = mapped_column(Text, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class AuditLog(Base):
    """Who moved money and why, for operations whose authority carries `audit`
    (admin operations); written by `ledger.apply` in the same transaction."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    tx_id: Mapped[int | None] = mapped_column(BigInteger)
    actor: Mapped[str] = mapped_column(Text, nullable=False)
    reason: Mapped[str | None] = mapped_column(Text)
    op: Mapped[str] = mapped_column(Text, nullable=False)
    user_id: Mapped[str] = mapped_column(Text, nullable=False)
    amount_milli: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class Transaction(Base):
    """A journal entry. Append-only; `kind` is one of grant, debit, reserve, capture,
    release, hold_expiry, grant_expiry, refund, clawback. `refund_of` is the charge a
    refund returns, or the grant transaction a clawback reverses."""

    __tablename__ = "transactions"
    __table_args__ = (
        Index("ix_transactions_user_created", "user_id", "id"),
        Index(
            "ix_transactions_refund_of", "refund_of", postgresql_where=text("refund_of IS NOT NULL")
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    user_id: Mapped[str] = mapped_column(Text, nullable=False)
    app: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str | None] = mapped_column(Text)
    # Effect on the user's spendable credit: positive adds, negative removes.
    delta_milli: Mapped[int] = mapped_column(BigInteger, nullable=False)
    amount_milli: Mapped[int] = mapped_column(BigInteger, nullable=False)
    description: Mapped[str | None] = mapped_column(Text)
    reference: Mapped[str | None] = mapped_column(Text)
    hold_id: Mapped[str | None] = mapped_column(UUID(as_uuid=False))
    refund_of: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class Posting(Base):
    """One leg of a transaction. `account` is wallet|held (owner = user id) or a system
    account: issuance (owner = source), spend (owner = app), expired (owner = source).
    `debt` (owner = user id) carries clawed-back credit that was already spent."""

    __tablename__ = "postings"
    __table_args__ = (
        CheckConstraint("amount_milli <> 0", name="amount_not_zero"),
        # (tx_id, id): one index serves the key and every lookup by transaction.
        PrimaryKeyConstraint("tx_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, autoincrement=True)
    # No foreign key: written only by `ledger._journal` with its transaction; `ku ledger
    # verify` checks the link (`records_linked`).
    tx_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    account: Mapped[str] = mapped_column(Text, nullable=False)
    owner: Mapped[str] = mapped_column(Text, nullable=False)
    amount_milli: Mapped[int] = mapped_column(BigInteger, nullable=False)


class Allowance(Base):
    """A user's allowance of one kind for one month: a number of UNITS (e.g. included
    enhancements), never Ku. Not part of any balance, never spendable as credit, never
    touched by debits or holds. `granted` only rises (a grant is "at least N"); `used`
    counts draws that are active or confirmed (a returned or expired draw gave its unit
    back, unless the period had ended). After `expires_at` (the first instant of the
    next month, UTC) nothing is drawn or given back: what was unused is gone.
    Each change has its row in `allowance_entries` (`ku ledger verify`)."""

    __tablename__ = "allowances"
    __table_args__ = (
        CheckConstraint("granted >= 0", name="granted_not_negative"),
        CheckConstraint("used >= 0 AND used <= granted", name="used_in_range"),
    )

    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    kind: Mapped[str] = mapped_column(Text, primary_key=True)
    period: Mapped[str] = mapped_column(Text, primary_key=True)  # 'YYYY-MM'
    granted: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    used: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class AllowanceDraw(Base):
    """One unit drawn for a `reference` (at most one draw per reference, ever). Active
    until confirmed or returned; an active draw past `expires_at` (its TTL) is expired by
    the sweep or the next operation on it, and its unit comes back."""

    __tablename__ = "allowance_draws"
    __table_args__ = (
        CheckConstraint(
            "status IN ('active', 'confirmed', 'returned', 'expired')", name="status_known"
        ),
        Index(
            "ix_allowance_draws_expiring",
            "expires_at",
            postgresql_where=text("status = 'active'"),
        ),
        Index("ix_allowance_draws_allowance", "user_id", "kind", "period"),
    )

    reference: Mapped[str] = mapped_column(Text, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text, nullable=False)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    period: Mapped[str] = mapped_column(Text, nullable=False)
    owner: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default="active")
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AllowanceEntry(Base):
    """Every movement of an allowance, append-only: a grant's increase (`granted_delta`),
    a draw (`used_delta` +1), a return or a TTL expiry (-1, or 0 once the period has
    ended: nothing comes back), a confirmation (0). Per allowance the entries sum to its
    `granted` and `used`."""

    __tablename__ = "allowance_entries"
    __table_args__ = (
        CheckConstraint(
            "entry IN ('grant', 'draw', 'confirm', 'return', 'expiry')", name="entry_known"
        ),
        Index("ix_allowance_entries_allowance", "user_id", "kind", "period"),
        Index(
            "ix_allowance_entries_reference",
            "reference",
            postgresql_where=text("reference IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text, nullable=False)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    period: Mapped[str] = mapped_column(Text, nullable=False)
    entry: Mapped[str] = mapped_column(Text, nullable=False)
    granted_delta: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    used_delta: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    reference: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


metadata = Base.metadata

# Billing's tables live in this schema too (services/ledger/billing/models.py);
# imported here so Alembic sees one metadata for the whole service.
from services.ledger.billing import models as _billing_models  # noqa: E402, F401
