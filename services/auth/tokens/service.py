"""Ku sessions: an SSO login (or nothing else, for now) opens a refresh-token
family; every refresh rotates the token within its family.

A refresh token is single use. Presenting one that was already used (or logged
out) means it leaked, or the client raced itself: the whole family is revoked,
so whoever holds the newest token must log in again.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from services.auth.config import AuthSettings
from services.auth.models import User
from services.auth.tokens.repository import TokenRepository
from services.auth.tokens.schemas import TokenPair
from services.auth.tokens.signing import KeyRing
from services.auth.tokens.sso import SsoVerifier
from services.auth.users.schemas import User as UserOut
from services.auth.users.service import users
from services.kit.errors import Unauthorized


class RefreshTokenReused(Unauthorized):
    code = "refresh_token_reused"
    message = "This refresh token was already used; the session is revoked"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _invalid_refresh() -> Unauthorized:
    return Unauthorized("Invalid or expired refresh token", code="invalid_refresh_token")


class TokenService:
    def __init__(self, settings: AuthSettings, keyring: KeyRing, sso: SsoVerifier) -> None:
        self.settings = settings
        self.keyring = keyring
        self.sso = sso

    def scopes(self, roles: list[str]) -> str:
        """A user's token scopes: every user's, and each role's own (`admin`)."""
        return " ".join(dict.fromkeys([*self.settings.user_scopes, *roles]))

    def access_token(
        self,
        user_id: str,
        *,
        app: str | None = None,
        roles: list[str] | None = None,
        now: datetime | None = None,
    ) -> str:
        issued = int((now or datetime.now(UTC)).timestamp())
        claims: dict[str, object] = {
            "sub": user_id,
            "iss": self.settings.auth_token_issuer,
            "aud": self.settings.auth_token_audience,
            "iat": issued,
            "exp": issued + self.settings.auth_access_token_ttl_seconds,
            "jti": uuid.uuid4().hex,
            "scope": self.scopes(roles or []),
        }
        if app:
            claims["app"] = app
        return self.keyring.sign(claims)

    async def exchange_sso(
        self, session: AsyncSession, token: str, *, app: str | None = None
    ) -> TokenPair:
        """Verify the main site's JWT, create the user on first login, link them to the
        app they signed in through, open a session."""
        identity = await self.sso.verify(token)
        user, _ = await users.create(
            session, identity.user_id, email=identity.email, username=identity.name
        )
        if app is not None:
            await users.link(session, user.id, app)
        return await self._issue(session, user, family_id=str(uuid.uuid4()), app=app)

    async def refresh(self, session: AsyncSession, refresh_token: str) -> TokenPair:
        repo = TokenRepository(session)
        row = await repo.refresh_token_for_update(hash_token(refresh_token))
        now = datetime.now(UTC)
        if row is None:
            raise _invalid_refresh()
        if row.revoked_at is not None:
            await repo.revoke_family(row.family_id, now)
            raise RefreshTokenReused()
        if row.expires_at <= now:
            raise _invalid_refresh()
        user = await users.get(session, row.user_id)
        pair, new_id = await self._issue_with_id(
            session, user, family_id=row.family_id, app=row.app
        )
        await repo.mark_rotated(row.id, new_id, now)
        return pair

    async def logout(self, session: AsyncSession, refresh_token: str) -> None:
        """Revoke the session the token belongs to; unknown tokens are ignored."""
        repo = TokenRepository(session)
        family = await repo.family_of(hash_token(refresh_token))
        if family is not None:
            await repo.revoke_family(family, datetime.now(UTC))

    async def _issue(
        self, session: AsyncSession, user: User, *, family_id: str, app: str | None
    ) -> TokenPair:
        pair, _ = await self._issue_with_id(session, user, family_id=family_id, app=app)
        return pair

    async def _issue_with_id(
        self, session: AsyncSession, user: User, *, family_id: str, app: str | None
    ) -> tuple[TokenPair, str]:
        refresh_token = secrets.token_urlsafe(48)
        ttl = self.settings.auth_refresh_token_ttl_seconds
        row = await TokenRepository(session).add_refresh_token(
            token_hash=hash_token(refresh_token),
            family_id=family_id,
            user_id=user.id,
            expires_at=datetime.now(UTC) + timedelta(seconds=ttl),
            app=app,
        )
        roles = await users.roles(session, user.id)  # read at every sign-in and refresh
        pair = TokenPair(
            access_token=self.access_token(user.id, app=app, roles=roles),
            expires_in=self.settings.auth_access_token_ttl_seconds,
            scope=self.scopes(roles),
            refresh_token=refresh_token,
            refresh_expires_in=ttl,
            user=UserOut.model_validate(user),
        )
        return pair, row.id
