"""Every SQL statement on `auth.users`."""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.auth.models import App, User, UserApp, UserRole


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

    async def roles(self, user_id: str) -> list[str]:
        stmt = (
            select(UserRole.role)
            .where(UserRole.user_id == user_id, UserRole.revoked_at.is_(None))
            .order_by(UserRole.role)
        )
        return list((await self.session.scalars(stmt)).all())

    async def grant_role(self, user_id: str, role: str, *, by: str, reason: str) -> bool:
        """True when the user did not hold the role (a revoked grant is granted anew)."""
        stmt = (
            insert(UserRole)
            .values(user_id=user_id, role=role, granted_by=by, reason=reason)
            .on_conflict_do_update(
                index_elements=[UserRole.user_id, UserRole.role],
                set_={
                    "granted_by": by,
                    "reason": reason,
                    "granted_at": func.now(),
                    "revoked_at": None,
                    "revoked_by": None,
                    "revoke_reason": None,
                },
                where=UserRole.revoked_at.is_not(None),
            )
            .returning(UserRole.role)
        )
        return (await self.session.scalars(stmt)).first() is not None

    async def revoke_role(self, user_id: str, role: str, *, by: str, reason: str) -> bool:
        """True when the user held the role."""
        stmt = (
            update(UserRole)
            .where(
                UserRole.user_id == user_id,
                UserRole.role == role,
                UserRole.revoked_at.is_(None),
            )
            .values(revoked_at=func.now(), revoked_by=by, revoke_reason=reason)
            .returning(UserRole.role)
        )
        return (await self.session.scalars(stmt)).first() is not None
