"""Every SQL statement on `auth.refresh_tokens` and `auth.signing_keys`."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.auth.models import RefreshToken, SigningKey


class TokenRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add_refresh_token(
        self,
        *,
        token_hash: str,
        family_id: str,
        user_id: str,
        expires_at: datetime,
        app: str | None = None,
    ) -> RefreshToken:
        row = RefreshToken(
            id=str(uuid.uuid4()),
            token_hash=token_hash,
            family_id=family_id,
            user_id=user_id,
            expires_at=expires_at,
            app=app,
        )
        self.session.add(row)
        await self.session.flush()
        return row

    async def refresh_token_for_update(self, token_hash: str) -> RefreshToken | None:
        """Locks the row: two concurrent uses of one token are serialised, the second
        sees it revoked and is treated as reuse."""
        stmt = select(RefreshToken).where(RefreshToken.token_hash == token_hash).with_for_update()
        return (await self.session.scalars(stmt)).one_or_none()

    async def mark_rotated(self, token_id: str, replaced_by: str, at: datetime) -> None:
        await self.session.execute(
            update(RefreshToken)
            .where(RefreshToken.id == token_id)
            .values(revoked_at=at, replaced_by=replaced_by)
        )

    async def revoke_family(self, family_id: str, at: datetime) -> int:
        result = await self.session.execute(
            update(RefreshToken)
            .where(RefreshToken.family_id == family_id, RefreshToken.revoked_at.is_(None))
            .values(revoked_at=at)
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    async def family_of(self, token_hash: str) -> str | None:
        stmt = select(RefreshToken.family_id).where(RefreshToken.token_hash == token_hash)
        return (await self.session.scalars(stmt)).one_or_none()

    async def dev_signing_key(self, create: Callable[[], tuple[str, str, str]]) -> SigningKey:
        """The oldest generated signing key; `create()` -> (kid, algorithm, pem) makes one
        (once, under a lock) when none exists."""
        await self.session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext('auth.signing_keys'))")
        )
        stmt = select(SigningKey).order_by(SigningKey.created_at, SigningKey.kid).limit(1)
        row = (await self.session.scalars(stmt)).one_or_none()
        if row is None:
            kid, algorithm, pem = create()
            row = SigningKey(kid=kid, algorithm=algorithm, private_pem=pem)
            self.session.add(row)
            await self.session.flush()
        return row
