"""Every SQL statement of the workspace."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

# Listing never reads the content columns: a page of 100 projects stays small.
_SUMMARY = (
    "code, user_id, app_source, project_type, title, content_type, size_bytes,"
    " metadata, created_at, updated_at"
)
_FULL = f"{_SUMMARY}, content_text, content_bytes"


def _like_pattern(q: str) -> str:
    escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class WorkspaceRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # --- projects -------------------------------------------------------------

    async def insert_project(self, values: dict[str, Any]) -> dict[str, Any] | None:
        """Insert unless the code is taken (then None: pick another code)."""
        row = await self.session.execute(
            text(
                f"""
                INSERT INTO workspace.projects
                  (code, user_id, app_source, project_type, title, content_type,
                   content_text, content_bytes, metadata, size_bytes)
                VALUES (:code, :user_id, :app_source, :project_type, :title, :content_type,
                        :content_text, :content_bytes, CAST(:metadata AS jsonb), :size_bytes)
                ON CONFLICT (code) DO NOTHING
                RETURNING {_SUMMARY}
                """
            ),
            {**values, "metadata": orjson.dumps(values["metadata"]).decode()},
        )
        found = row.first()
        return dict(found._mapping) if found else None

    async def project(self, code: str, *, for_update: bool = False) -> dict[str, Any] | None:
        lock = " FOR UPDATE" if for_update else ""
        row = await self.session.execute(
            text(f"SELECT {_FULL} FROM workspace.projects WHERE code = :c{lock}"), {"c": code}
        )
        found = row.first()
        return dict(found._mapping) if found else None

    async def update_project(self, code: str, values: dict[str, Any]) -> dict[str, Any]:
        params = dict(values)
        sets = [f"{column} = :{column}" for column in values if column != "metadata"]
        if "metadata" in values:
            sets.append("metadata = CAST(:metadata AS jsonb)")
            params["metadata"] = orjson.dumps(values["metadata"]).decode()
        sets.append("updated_at = now()")
        row = await self.session.execute(
            text(
                f"UPDATE workspace.projects SET {', '.join(sets)} WHERE code = :code"
                f" RETURNING {_SUMMARY}"
            ),
            {**params, "code": code},
        )
        return dict(row.one()._mapping)

    async def delete_project(self, code: str) -> None:
        await self.session.execute(
            text("DELETE FROM workspace.projects WHERE code = :c"), {"c": code}
        )

    async def list_projects(
        self,
        user_id: str,
        *,
        app_source: str | None,
        project_type: str | None,
        q: str | None,
        before: tuple[datetime, str] | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        where = ["user_id = :u"]
        params: dict[str, Any] = {"u": user_id, "limit": limit}
        if app_source:
            where.append("app_source = :app")
            params["app"] = app_source
        if project_type:
            where.append("project_type = :type")
            params["type"] = project_type
        if q:
            where.append("title ILIKE :q ESCAPE '\\'")
            params["q"] = _like_pattern(q)
        if before:
            where.append("(created_at, code) < (:before_at, :before_code)")
            params["before_at"], params["before_code"] = before
        rows = await self.session.execute(
            text(
                f"SELECT {_SUMMARY} FROM workspace.projects WHERE {' AND '.join(where)}"
                " ORDER BY created_at DESC, code DESC LIMIT :limit"
            ),
            params,
        )
        return [dict(r._mapping) for r in rows]

    async def usage_by_app(self, user_id: str) -> list[dict[str, Any]]:
        rows = await self.session.execute(
            text(
                "SELECT app_source, SUM(size_bytes)::bigint AS bytes, COUNT(*)::int AS count"
                " FROM workspace.projects WHERE user_id = :u GROUP BY app_source"
                " ORDER BY app_source"
            ),
            {"u": user_id},
        )
        return [dict(r._mapping) for r in rows]

    # --- usage and quota ------------------------------------------------------

    async def ensure_usage(self, user_id: str) -> None:
        await self.session.execute(
            text(
                "INSERT INTO workspace.usage (user_id) VALUES (:u) ON CONFLICT (user_id) DO NOTHING"
            ),
            {"u": user_id},
        )

    async def change_usage(self, user_id: str, delta: int, default_limit: int) -> bool:
        """Add `delta` bytes to the user's usage if it fits under the limit.

        One conditional UPDATE: its row lock makes concurrent saves of one user take
        turns, and each re-checks the condition against the committed total, so no
        interleaving can pass the limit. Shrinking (delta <= 0) always succeeds."""
        row = await self.session.execute(
            text(
                """
                UPDATE workspace.usage
                   SET used_bytes = used_bytes + CAST(:d AS bigint), updated_at = now()
                 WHERE user_id = :u
                   AND (CAST(:d AS bigint) <= 0
                        OR used_bytes + CAST(:d AS bigint)
                           <= COALESCE(limit_bytes, CAST(:default_limit AS bigint)))
                RETURNING used_bytes
                """
            ),
            {"u": user_id, "d": delta, "default_limit": default_limit},
        )
        return row.first() is not None

    async def usage(self, user_id: str) -> dict[str, Any] | None:
        row = await self.session.execute(
            text("SELECT used_bytes, limit_bytes FROM workspace.usage WHERE user_id = :u"),
            {"u": user_id},
        )
        found = row.first()
        return dict(found._mapping) if found else None

    async def set_limit(self, user_id: str, limit_bytes: int | None) -> None:
        await self.session.execute(
            text(
                """
                INSERT INTO workspace.usage (user_id, limit_bytes) VALUES (:u, :l)
                ON CONFLICT (user_id) DO UPDATE SET limit_bytes = :l, updated_at = now()
                """
            ),
            {"u": user_id, "l": limit_bytes},
        )

    async def is_linked(self, user_id: str, app: str) -> bool:
        row = await self.session.execute(
            text("SELECT 1 FROM workspace.app_links WHERE user_id = :u AND app = :a"),
            {"u": user_id, "a": app},
        )
        return row.first() is not None

    async def link(self, user_id: str, app: str) -> None:
        await self.session.execute(
            text(
                "INSERT INTO workspace.app_links (user_id, app) VALUES (:u, :a)"
                " ON CONFLICT DO NOTHING"
            ),
            {"u": user_id, "a": app},
        )
