"""Workspace tables (schema `workspace`).

Invariants:
- a project's content is text or bytes, never both (`content_text` xor `content_bytes`);
- `usage.used_bytes` equals the sum of the user's projects' `size_bytes`: every
  insert, resize and delete changes both in one transaction, and the quota is
  checked by the conditional UPDATE of that usage row (its row lock serializes
  concurrent saves of one user).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, DateTime, Index, LargeBinary, Text, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.kit.bus import processed_events_table
from services.kit.db import schema_metadata
from services.kit.idempotency import idempotency_table
from services.kit.outbox import outbox_table

SCHEMA = "workspace"


class Base(DeclarativeBase):
    metadata = schema_metadata(SCHEMA)


outbox = outbox_table(Base.metadata)
processed_events = processed_events_table(Base.metadata)
idempotency_keys = idempotency_table(Base.metadata)

# No 0/O, 1/I/L: a code read aloud or copied by hand survives.
CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
CODE_LENGTH = 6
CODE_PATTERN = f"^[{CODE_ALPHABET}]{{{CODE_LENGTH}}}$"


class Project(Base):
    __tablename__ = "projects"
    __table_args__ = (
        CheckConstraint(f"code ~ '{CODE_PATTERN}'", name="code_format"),
        CheckConstraint("(content_text IS NULL) <> (content_bytes IS NULL)", name="one_content"),
        CheckConstraint("size_bytes >= 0", name="size_not_negative"),
        CheckConstraint("length(title) > 0", name="title_not_empty"),
        # Newest first per user, with the code as tie-breaker (the list's keyset cursor).
        Index("ix_projects_user_created", "user_id", "created_at", "code"),
    )

    code: Mapped[str] = mapped_column(Text, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text, nullable=False)
    app_source: Mapped[str] = mapped_column(Text, nullable=False)
    project_type: Mapped[str] = mapped_column(Text, nullable=False)
    title: Mapped[str] = mapped_column(Text, nullable=False)
    content_type: Mapped[str] = mapped_column(Text, nullable=False)
    content_text: Mapped[str | None] = mapped_column(Text)
    content_bytes: Mapped[bytes | None] = mapped_column(LargeBinary)
    metadata_: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, nullable=False, server_default="{}"
    )
    # What the project costs against the quota: content + title + metadata, in bytes.
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class Usage(Base):
    """One row per user who ever saved: bytes in use and an optional admin limit."""

    __tablename__ = "usage"
    __table_args__ = (
        CheckConstraint("used_bytes >= 0", name="used_not_negative"),
        CheckConstraint("limit_bytes IS NULL OR limit_bytes >= 0", name="limit_not_negative"),
    )

    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    used_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    # NULL: the service default (settings.default_quota_bytes).
    limit_bytes: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class AppLink(Base):
    """A user linked to a partner app (from auth's `user.linked` events): that app's keys
    may read and write this user's projects."""

    __tablename__ = "app_links"

    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    app: Mapped[str] = mapped_column(Text, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


metadata = Base.metadata
