"""Every SQL statement on `auth.users`."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.auth.models import User


class UserRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def insert_if_absent(
        self, user_id: str, *, username: str | None, email: str | None
    ) -> User | None:
        """The new user, or None when the id exists (a concurrent insert waits, then yields)."""
        stmt = (
            insert(User)
            .values(id=user_id, username=username, email=email)
            .on_conflict_do_nothing(index_elements=[User.id])
            .returning(User)
        )
        return (await self.session.scalars(stmt)).one_or_none()

    async def get(self, user_id: str) -> User | None:
        return (await self.session.scalars(select(User).where(User.id == user_id))).one_or_none()
