"""Every SQL statement on `auth.users`."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.auth.models import App, User, UserApp


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

    async def app_exists(self, app: str) -> bool:
        return (
            await self.session.scalars(select(App.name).where(App.name == app))
        ).first() is not None

    async def link(self, user_id: str, app: str) -> bool:
        """True when this call made the link."""
        stmt = (
            insert(UserApp)
            .values(user_id=user_id, app=app)
            .on_conflict_do_nothing(index_elements=[UserApp.user_id, UserApp.app])
            .returning(UserApp.app)
        )
        return (await self.session.scalars(stmt)).first() is not None

    async def apps(self, user_id: str) -> list[str]:
        stmt = select(UserApp.app).where(UserApp.user_id == user_id).order_by(UserApp.app)
        return list((await self.session.scalars(stmt)).all())
