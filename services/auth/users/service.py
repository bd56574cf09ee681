"""Users: created once, by an app with `users:write` or on first SSO login; linked to
the apps they came through.

Creation writes the `user.created` event in the same transaction (the ledger grants
the first credits from it: the welcome credits, or an admin's initial credits instead);
an existing id is returned unchanged. A new link writes `user.linked` (the ledger and
the workspace let a partner key act for its linked users only).

Roles: an admin may give a user the `admin` role (with a reason, kept on the row with
who gave it); the user's next access token carries the `admin` scope, so the account
is an admin everywhere an admin key is (docs/kit.md, authority). Revoking takes effect
at the next token (access tokens live KU_AUTH_ACCESS_TOKEN_TTL_SECONDS; the console
checks the role on every page).
"""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncSession

from services.auth.models import User, outbox
from services.auth.users.repository import UserRepository
from services.kit.errors import NotFound, Unprocessable
from services.kit.outbox import emit

log = logging.getLogger("ku.auth.users")

USER_CREATED = "user.created"
USER_LINKED = "user.linked"


class UserService:
    async def create(
        self,
        session: AsyncSession,
        user_id: str,
        *,
        email: str | None,
        username: str | None,
        initial_credits_milli: int | None = None,
        created_by: str | None = None,
        reason: str | None = None,
    ) -> tuple[User, bool]:
        """The user and whether this call created it. `initial_credits_milli` (admins)
        replaces the welcome credits: it travels in the event, so it is the one grant."""
        repo = UserRepository(session)
        user = await repo.insert_if_absent(user_id, username=username, email=email)
        if user is not None:
            payload: dict[str, object] = {
                "user_id": user.id,
                "username": user.username,
                "email": user.email,
            }
            if initial_credits_milli:
                payload.update(
                    initial_credits_milli=initial_credits_milli,
                    created_by=created_by,
                    reason=reason,
                )
            await emit(session, outbox, USER_CREATED, payload)
            return user, True
        existing = await repo.get(user_id)
        assert existing is not None  # the conflicting row is committed and never deleted
        return existing, False

    async def link(
        self, session: AsyncSession, user_id: str, app: str, *, strict: bool = True
    ) -> bool:
        """Link a user to an app (idempotent); True when the link is new. An app that
        was never registered is 422 (`strict`) or no link."""
        repo = UserRepository(session)
        if not await repo.app_exists(app):
            if not strict:
                return False
            raise Unprocessable("No such app", code="unknown_app", app=app)
        if await repo.link(user_id, app):
            await emit(session, outbox, USER_LINKED, {"user_id": user_id, "app": app})
            return True
        return False

    async def apps(self, session: AsyncSession, user_id: str) -> list[str]:
        return await UserRepository(session).apps(user_id)

    async def roles(self, session: AsyncSession, user_id: str) -> list[str]:
        """The roles a user holds now (their scopes join the user's access tokens)."""
        return await UserRepository(session).roles(user_id)

    async def grant_role(
        self, session: AsyncSession, user_id: str, role: str, *, by: str, reason: str
    ) -> bool:
        await self.get(session, user_id)
        granted = await UserRepository(session).grant_role(user_id, role, by=by, reason=reason)
        if granted:
            log.warning("role %s granted to user %s by %s: %s", role, user_id, by, reason)
        return granted

    async def revoke_role(
        self, session: AsyncSession, user_id: str, role: str, *, by: str, reason: str
    ) -> bool:
        await self.get(session, user_id)
        revoked = await UserRepository(session).revoke_role(user_id, role, by=by, reason=reason)
        if revoked:
            log.warning("role %s revoked from user %s by %s: %s", role, user_id, by, reason)
        return revoked

    async def get(self, session: AsyncSession, user_id: str) -> User:
        user = await UserRepository(session).get(user_id)
        if user is None:
            raise NotFound("No such user", code="unknown_user", user_id=user_id)
        return user


users = UserService()
