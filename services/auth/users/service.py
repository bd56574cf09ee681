"""Users: created once, by an app with `users:write` or on first SSO login.

Creation writes the `user.created` event in the same transaction (the ledger
grants the welcome credits from it); an existing id is returned unchanged.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from services.auth.models import User, outbox
from services.auth.users.repository import UserRepository
from services.kit.errors import NotFound
from services.kit.outbox import emit

USER_CREATED = "user.created"


class UserService:
    async def create(
        self, session: AsyncSession, user_id: str, *, email: str | None, username: str | None
    ) -> tuple[User, bool]:
        """The user and whether this call created it."""
        repo = UserRepository(session)
        user = await repo.insert_if_absent(user_id, username=username, email=email)
        if user is not None:
            await emit(
                session,
                outbox,
                USER_CREATED,
                {"user_id": user.id, "username": user.username, "email": user.email},
            )
            return user, True
        existing = await repo.get(user_id)
        assert existing is not None  # the conflicting row is committed and never deleted
        return existing, False

    async def get(self, session: AsyncSession, user_id: str) -> User:
        user = await UserRepository(session).get(user_id)
        if user is None:
            raise NotFound("No such user", code="unknown_user", user_id=user_id)
        return user


users = UserService()
