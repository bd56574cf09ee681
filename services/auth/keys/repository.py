"""Every SQL statement on `auth.apps` and `auth.api_keys`."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.auth.models import ApiKey, App


class KeyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def insert_app(self, name: str, description: str | None) -> App | None:
        stmt = (
            insert(App)
            .values(name=name, description=description)
            .on_conflict_do_nothing(index_elements=[App.name])
            .returning(App)
        )
        return (await self.session.scalars(stmt)).one_or_none()

    async def app(self, name: str) -> App | None:
        return (await self.session.scalars(select(App).where(App.name == name))).one_or_none()

    async def apps_with_active_keys(self, now: datetime) -> list[tuple[App, int]]:
        active = (
            select(func.count())
            .where(
                ApiKey.app == App.name,
                ApiKey.revoked_at.is_(None),
                (ApiKey.expires_at.is_(None)) | (ApiKey.expires_at > now),
            )
            .scalar_subquery()
        )
        rows = await self.session.execute(select(App, active).order_by(App.name))
        return [(row[0], int(row[1])) for row in rows]

    async def insert_key(
        self,
        *,
        prefix: str,
        app: str,
        key_hash: str,
        scopes: list[str],
        name: str | None,
        expires_at: datetime | None,
    ) -> ApiKey | None:
        """The new key, or None if the prefix is taken (the caller draws another)."""
        stmt = (
            insert(ApiKey)
            .values(
                prefix=prefix,
                app=app,
                key_hash=key_hash,
                scopes=scopes,
                name=name,
                expires_at=expires_at,
            )
            .on_conflict_do_nothing(index_elements=[ApiKey.prefix])
            .returning(ApiKey)
        )
        return (await self.session.scalars(stmt)).one_or_none()

    async def key(self, prefix: str, *, for_update: bool = False) -> ApiKey | None:
        stmt = select(ApiKey).where(ApiKey.prefix == prefix)
        if for_update:
            stmt = stmt.with_for_update()
        return (await self.session.scalars(stmt)).one_or_none()

    async def keys(self, app: str | None = None) -> list[ApiKey]:
        stmt = select(ApiKey).order_by(ApiKey.app, ApiKey.created_at, ApiKey.prefix)
        if app is not None:
            stmt = stmt.where(ApiKey.app == app)
        return list(await self.session.scalars(stmt))

    async def touch(self, prefix: str, now: datetime, not_since: datetime) -> None:
        """Set last_used_at unless another request did so after `not_since`."""
        await self.session.execute(
            update(ApiKey)
            .where(
                ApiKey.prefix == prefix,
                (ApiKey.last_used_at.is_(None)) | (ApiKey.last_used_at < not_since),
            )
            .values(last_used_at=now)
        )
