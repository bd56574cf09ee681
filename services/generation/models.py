"""Generation tables (schema `generation`).

- `generations`: every generation (text, tool, chat completion, story part) with who
  asked, which model and provider served it, the words delivered and what they cost.
  `status`: running -> completed | failed | cancelled (client left: charged for what
  it received). `hold_id` ties it to the ledger: the cost is what was captured.
- `stories` / `story_parts`: a story is an outline (part 0) and chapters (1..n). Every
  part is held at submit (so a story that cannot be paid is refused before any
  provider call); a part is `held` -> `generated` (text stored) -> `charged` (hold
  captured). A runner holds the story's lease; when a process dies, another takes the
  story over after the lease and resumes at the first part not charged: a `generated`
  part is captured (idempotent by hold id), a `charged` part is never touched again.
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
    ForeignKey,
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

SCHEMA = "generation"


class Base(DeclarativeBase):
    metadata = schema_metadata(SCHEMA)


outbox = outbox_table(Base.metadata)
processed_events = processed_events_table(Base.metadata)
idempotency_keys = idempotency_table(Base.metadata)


class Generation(Base):
    __tablename__ = "generations"
    __table_args__ = (
        CheckConstraint("words >= 0", name="words_not_negative"),
        CheckConstraint("cost_milli >= 0", name="cost_not_negative"),
        Index("ix_generations_user_created", "user_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    user_id: Mapped[str] = mapped_column(Text, nullable=False)
    app: Mapped[str] = mapped_column(Text, nullable=False)
    # text | tool:<name> | chat | story
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    model: Mapped[str] = mapped_column(Text, nullable=False)
    # Who actually answered (after fallback); NULL until a provider answered.
    served_model: Mapped[str | None] = mapped_column(Text)
    provider: Mapped[str | None] = mapped_column(Text)
    offline: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    prompt: Mapped[str] = mapped_column(Text, nullable=False)
    output: Mapped[str | None] = mapped_column(Text)
    max_words: Mapped[int] = mapped_column(Integer, nullable=False)
    words: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    held_milli: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    cost_milli: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    hold_id: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, nullable=False)
    error: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    project_code: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Story(Base):
    __tablename__ = "stories"
    __table_args__ = (
        CheckConstraint("chapters BETWEEN 1 AND 50", name="chapters_range"),
        Index("ix_stories_user_created", "user_id", "created_at"),
        Index("ix_stories_running_lease", "lease_until", postgresql_where="status = 'running'"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    user_id: Mapped[str] = mapped_column(Text, nullable=False)
    app: Mapped[str] = mapped_column(Text, nullable=False)
    model: Mapped[str] = mapped_column(Text, nullable=False)
    premise: Mapped[str] = mapped_column(Text, nullable=False)
    title: Mapped[str | None] = mapped_column(Text)
    chapters: Mapped[int] = mapped_column(Integer, nullable=False)
    words_per_chapter: Mapped[int] = mapped_column(Integer, nullable=False)
    temperature_milli: Mapped[int] = mapped_column(Integer, nullable=False)
    # running -> completed | failed
    status: Mapped[str] = mapped_column(Text, nullable=False)
    error: Mapped[str | None] = mapped_column(Text)
    lease_until: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    # How many times a runner took it (1 = never resumed).
    runs: Mapped[int] = mapped_column(Integer, nullable=False, server_default="1")
    options: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default="{}")
    project_code: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class StoryPart(Base):
    __tablename__ = "story_parts"
    __table_args__ = (
        CheckConstraint("words >= 0 AND cost_milli >= 0", name="amounts_not_negative"),
    )

    story_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("stories.id", ondelete="CASCADE"), primary_key=True
    )
    # 0 is the outline, 1..n the chapters.
    n: Mapped[int] = mapped_column(Integer, primary_key=True)
    hold_id: Mapped[str] = mapped_column(Text, nullable=False)
    held_milli: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # held -> generated -> charged | released
    status: Mapped[str] = mapped_column(Text, nullable=False)
    text: Mapped[str | None] = mapped_column(Text)
    served_model: Mapped[str | None] = mapped_column(Text)
    provider: Mapped[str | None] = mapped_column(Text)
    words: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    cost_milli: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


metadata = Base.metadata
