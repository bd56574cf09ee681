"""Auth tables (schema `auth`).

Secrets are never stored: API keys and refresh tokens are kept as sha256 hashes
(both are 256-bit random values, so a plain hash is enough), API keys also by
their visible prefix. `signing_keys` holds the generated access-token key of
development and test runs only; production passes KU_AUTH_PRIVATE_KEY.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Index, Text, func
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.kit.db import schema_metadata
from services.kit.outbox import outbox_table

SCHEMA = "auth"


class Base(DeclarativeBase):
    metadata = schema_metadata(SCHEMA)


outbox = outbox_table(Base.metadata)


class User(Base):
    __tablename__ = "users"

    # SSO ids are 21-digit numbers: text, never an integer column.
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    username: Mapped[str | None] = mapped_column(Text)
    email: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class App(Base):
    """A client application (penora, imagegene, a partner) that holds API keys."""

    __tablename__ = "apps"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (Index("ix_api_keys_app", "app"),)

    prefix: Mapped[str] = mapped_column(Text, primary_key=True)
    app: Mapped[str] = mapped_column(Text, ForeignKey(f"{SCHEMA}.apps.name"), nullable=False)
    # sha256 hex of the whole key.
    key_hash: Mapped[str] = mapped_column(Text, nullable=False)
    scopes: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False)
    name: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set on the old key by a rotation: the prefix of the key that replaced it.
    replaced_by: Mapped[str | None] = mapped_column(Text)


class RefreshToken(Base):
    """One refresh token. Tokens rotated from one login share a `family_id`; a reused
    (already rotated) token revokes the whole family."""

    __tablename__ = "refresh_tokens"
    __table_args__ = (
        Index("ix_refresh_tokens_family", "family_id"),
        Index("ix_refresh_tokens_user", "user_id"),
    )

    id: Mapped[str] = mapped_column(UUID(as_uuid=False), primary_key=True)
    token_hash: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    family_id: Mapped[str] = mapped_column(UUID(as_uuid=False), nullable=False)
    user_id: Mapped[str] = mapped_column(Text, ForeignKey(f"{SCHEMA}.users.id"), nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    # Set when the token is used (rotated), logged out, or its family is revoked.
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    replaced_by: Mapped[str | None] = mapped_column(UUID(as_uuid=False))
    # The app the user signed in through (the access token's `app` claim), kept
    # across refreshes.
    app: Mapped[str | None] = mapped_column(Text)


class UserApp(Base):
    """A user linked to an app: signed in through its SSO exchange, created by its key,
    or linked by an admin. Partner keys act only for their linked users (the ledger
    and the workspace learn links from `user.linked` events)."""

    __tablename__ = "user_apps"

    user_id: Mapped[str] = mapped_column(Text, ForeignKey(f"{SCHEMA}.users.id"), primary_key=True)
    app: Mapped[str] = mapped_column(Text, ForeignKey(f"{SCHEMA}.apps.name"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class UserRole(Base):
    """A role an admin gave a user (only `admin` exists): it puts the role's scope in the
    user's access tokens. Never deleted: a revocation is recorded on the row, with who
    granted and revoked it and why."""

    __tablename__ = "user_roles"

    user_id: Mapped[str] = mapped_column(Text, ForeignKey(f"{SCHEMA}.users.id"), primary_key=True)
    role: Mapped[str] = mapped_column(Text, primary_key=True)
    granted_by: Mapped[str] = mapped_column(Text, nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    granted_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_by: Mapped[str | None] = mapped_column(Text)
    revoke_reason: Mapped[str | None] = mapped_column(Text)


class SigningKey(Base):
    """Generated access-token signing keys (development and test only)."""

    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(Text, primary_key=True)
    algorithm: Mapped[str] = mapped_column(Text, nullable=False)
    private_pem: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


metadata = Base.metadata
