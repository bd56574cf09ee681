"""The workspace's rules: who may touch which project, what content is accepted,
what a project costs against the quota, and the events a change emits. All SQL
is in repository.py; the request's Session commits (services never do)."""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from services.kit import idempotency
from services.kit.authority import Permit
from services.kit.errors import BadRequest, Forbidden, NotFound, PayloadTooLarge, Unprocessable
from services.kit.outbox import emit
from services.kit.principal import Principal
from services.workspace.config import WorkspaceSettings
from services.workspace.content import Content, parse_content
from services.workspace.exports import ExportSource
from services.workspace.models import CODE_ALPHABET, CODE_LENGTH, idempotency_keys, outbox
from services.workspace.repository import WorkspaceRepository
from services.workspace.schemas import ProjectCreate, ProjectUpdate

_CODE_ATTEMPTS = 8


def new_code() -> str:
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def normalize_code(code: str) -> str | None:
    """Codes are case-insensitive on input; anything outside the alphabet is no code."""
    code = code.strip().upper()
    if len(code) == CODE_LENGTH and all(c in CODE_ALPHABET for c in code):
        return code
    return None


def project_size(content: Content, title: str, metadata: dict[str, Any]) -> int:
    """Bytes a project costs: its content plus its title and metadata as stored."""
    meta = len(orjson.dumps(metadata)) if metadata else 0
    return content.size_bytes + len(title.encode("utf-8")) + meta


def encode_cursor(created_at: datetime, code: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{code}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        at, code = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return datetime.fromisoformat(at), code
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("Invalid cursor", code="invalid_cursor") from None


@dataclass
class Created:
    status_code: int
    body: dict[str, Any]
    replayed: bool


@dataclass(frozen=True)
class Caller:
    """Who is calling and what the authority table allows them (services/kit/authority.py)."""

    principal: Principal
    permit: Permit


class Workspace:
    def __init__(self, session: AsyncSession, settings: WorkspaceSettings) -> None:
        self.session = session
        self.settings = settings
        self.repo = WorkspaceRepository(session)

    # --- reads ------------------------------------------------------------------

    async def check_user(self, caller: Caller, user_id: str) -> None:
        """May this caller touch `user_id`'s workspace? (The authority table's permit;
        a partner's link is looked up here, in this transaction.)"""
        linked = None
        if caller.permit.users.startswith("linked:"):
            linked = await self.repo.is_linked(user_id, caller.permit.users[7:])
        caller.permit.check_user(user_id, linked)

    def owner(self, caller: Caller, user_id: str | None) -> str:
        """The user a request is about: the one it names, or the caller's own user."""
        if user_id is not None:
            return user_id
        if caller.permit.users.startswith("self:"):
            return caller.permit.users[5:]
        raise Unprocessable("user_id is required", code="user_id_required")

    async def visible_project(
        self,
        caller: Caller,
        code: str,
        *,
        user_id: str | None = None,
        for_update: bool = False,
    ) -> dict[str, Any]:
        """The project if this caller may see it; otherwise the same 404 as for a
        code that does not exist, so nothing about other users' projects leaks."""
        if user_id is not None:
            await self.check_user(caller, user_id)
        normalized = normalize_code(code)
        project = await self.repo.project(normalized, for_update=for_update) if normalized else None
        if project is None or (user_id is not None and project["user_id"] != user_id):
            raise NotFound("No such project", code="project_not_found", project_code=code)
        try:
            await self.check_user(caller, project["user_id"])
        except Forbidden:
            raise NotFound("No such project", code="project_not_found", project_code=code) from None
        return project

    async def list(
        self,
        user_id: str,
        *,
        app_source: str | None,
        project_type: str | None,
        q: str | None,
        cursor: str | None,
        limit: int,
    ) -> tuple[list[dict[str, Any]], str | None]:
        rows = await self.repo.list_projects(
            user_id,
            app_source=app_source,
            project_type=project_type,
            q=q,
            before=decode_cursor(cursor) if cursor else None,
            limit=limit + 1,
        )
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1]["created_at"], rows[-1]["code"]) if more else None
        return rows, next_cursor

    async def storage(self, user_id: str) -> dict[str, Any]:
        usage = await self.repo.usage(user_id) or {"used_bytes": 0, "limit_bytes": None}
        limit = self._limit(usage)
        used = int(usage["used_bytes"])
        by_app = await self.repo.usage_by_app(user_id)
        return {
            "user_id": user_id,
            "used_bytes": used,
            "limit_bytes": limit,
            "available_bytes": max(limit - used, 0),
            "percent": round(used * 100 / limit, 2) if limit else (100.0 if used else 0.0),
            "project_count": sum(int(a["count"]) for a in by_app),
            "by_app": by_app,
        }

    # --- writes -----------------------------------------------------------------

    async def create(self, caller: Caller, body: ProjectCreate, *, key: str | None) -> Created:
        """Save a new project, within the owner's quota; replays an Idempotency-Key."""
        principal = caller.principal
        user_id = self.owner(caller, body.user_id)
        await self.check_user(caller, user_id)
        app_source = body.app_source or caller.permit.lane
        if not app_source:
            raise Unprocessable("app_source is required", code="app_source_required")
        if key is not None:
            fingerprint = idempotency.request_hash(
                {
                    "op": "create",
                    **body.model_dump(mode="json"),
                    "user_id": user_id,
                    "app_source": app_source,
                }
            )
            replay = await idempotency.claim(
                self.session, idempotency_keys, principal.idempotency_scope, key, fingerprint
            )
            if replay is not None:
                return Created(replay.status_code, replay.response, True)

        content = self._content(body.content, body.content_encoding, body.content_type)
        self._check_metadata(body.metadata)
        size = project_size(content, body.title, body.metadata)
        await self._reserve(user_id, size)
        values = {
            "user_id": user_id,
            "app_source": app_source,
            "project_type": body.project_type or ("image" if content.is_image else "text"),
            "title": body.title,
            "content_type": content.content_type,
            "content_text": content.text,
            "content_bytes": content.data,
            "metadata": body.metadata,
            "size_bytes": size,
        }
        for _ in range(_CODE_ATTEMPTS):
            row = await self.repo.insert_project({**values, "code": new_code()})
            if row is not None:
                break
        else:  # 31^6 codes: eight collisions in a row means something else is wrong
            raise RuntimeError("could not allocate a free project code")
        result = summary(row)
        await self._saved_event(row, created=True)
        if key is not None:
            await idempotency.complete(
                self.session, idempotency_keys, principal.idempotency_scope, key, 201, result
            )
        return Created(201, result, False)

    async def update(
        self, caller: Caller, code: str, body: ProjectUpdate, *, user_id: str | None
    ) -> dict[str, Any]:
        """Change title, content and/or metadata; a size change goes through the quota."""
        project = await self.visible_project(caller, code, user_id=user_id, for_update=True)
        changes: dict[str, Any] = {}
        title = project["title"]
        metadata = project["metadata"]
        content = Content(
            project["content_type"], text=project["content_text"], data=project["content_bytes"]
        )
        if body.title is not None:
            title = changes["title"] = body.title
        if body.metadata is not None:
            self._check_metadata(body.metadata)
            metadata = changes["metadata"] = body.metadata
        if body.content is not None:
            content = self._content(body.content, body.content_encoding, body.content_type)
            changes.update(
                content_type=content.content_type,
                content_text=content.text,
                content_bytes=content.data,
            )
        elif body.content_type is not None and body.content_type != project["content_type"]:
            # Re-label stored text (plain <-> markdown) without resending it.
            if project["content_text"] is None:
                raise Unprocessable(
                    f"Content is {project['content_type']}, not {body.content_type}",
                    code="content_type_mismatch",
                )
            content = self._content(project["content_text"], "text", body.content_type)
            changes["content_type"] = content.content_type
        if not changes:
            return summary(project)
        size = project_size(content, title, metadata)
        delta = size - int(project["size_bytes"])
        if delta:
            await self._reserve(project["user_id"], delta)
        changes["size_bytes"] = size
        row = await self.repo.update_project(project["code"], changes)
        await self._saved_event(row, created=False)
        return summary(row)

    async def delete(self, caller: Caller, code: str, *, user_id: str | None) -> dict[str, Any]:
        """Remove a project and give its bytes back to the owner's quota at once."""
        project = await self.visible_project(caller, code, user_id=user_id, for_update=True)
        await self.repo.delete_project(project["code"])
        await self.repo.change_usage(
            project["user_id"], -int(project["size_bytes"]), self.settings.default_quota_bytes
        )
        await emit(
            self.session,
            outbox,
            "project.deleted",
            {
                "code": project["code"],
                "user_id": project["user_id"],
                "app_source": project["app_source"],
                "project_type": project["project_type"],
                "size_bytes": int(project["size_bytes"]),
            },
        )
        return {
            "code": project["code"],
            "deleted": True,
            "size_bytes": int(project["size_bytes"]),
            "storage": await self.storage(project["user_id"]),
        }

    async def set_quota(self, user_id: str, limit_bytes: int | None) -> dict[str, Any]:
        """Set (or with None, reset) a user's limit. Lowering it below what is stored
        deletes nothing: the user just cannot grow until under the limit again."""
        await self.repo.set_limit(user_id, limit_bytes)
        return await self.storage(user_id)

    # --- helpers ----------------------------------------------------------------

    def _limit(self, usage: dict[str, Any]) -> int:
        limit = usage.get("limit_bytes")
        return int(limit) if limit is not None else self.settings.default_quota_bytes

    def _content(self, raw: str, encoding: str, declared_type: str | None) -> Content:
        if len(raw) > self.settings.max_content_chars:
            raise PayloadTooLarge(
                "Content is larger than one request may carry",
                code="content_too_large",
                max_chars=self.settings.max_content_chars,
            )
        return parse_content(raw, encoding=encoding, declared_type=declared_type)  # type: ignore[arg-type]

    def _check_metadata(self, metadata: dict[str, Any]) -> None:
        size = len(orjson.dumps(metadata))
        if size > self.settings.max_metadata_bytes:
            raise Unprocessable(
                f"metadata is {size} bytes as JSON; at most {self.settings.max_metadata_bytes}",
                code="metadata_too_large",
                metadata_bytes=size,
                max_metadata_bytes=self.settings.max_metadata_bytes,
            )

    async def _reserve(self, user_id: str, delta: int) -> None:
        """Take `delta` bytes of the user's quota in this transaction, or raise 413."""
        await self.repo.ensure_usage(user_id)
        if await self.repo.change_usage(user_id, delta, self.settings.default_quota_bytes):
            return
        usage = await self.repo.usage(user_id) or {"used_bytes": 0, "limit_bytes": None}
        limit = self._limit(usage)
        used = int(usage["used_bytes"])
        available = max(limit - used, 0)
        raise PayloadTooLarge(
            f"Storage limit exceeded: this needs {delta} more bytes but only {available} of"
            f" {limit} are available",
            code="storage_limit_exceeded",
            needed_bytes=delta,
            available_bytes=available,
            used_bytes=used,
            limit_bytes=limit,
        )

    async def _saved_event(self, row: dict[str, Any], *, created: bool) -> None:
        await emit(
            self.session,
            outbox,
            "project.saved",
            {**{k: v for k, v in summary(row).items() if k in _EVENT_FIELDS}, "created": created},
        )


_EVENT_FIELDS = (
    "code",
    "user_id",
    "app_source",
    "project_type",
    "title",
    "content_type",
    "size_bytes",
)


def summary(row: dict[str, Any]) -> dict[str, Any]:
    """A project without its content, JSON-ready (it is also the idempotent replay)."""
    return {
        "code": row["code"],
        "user_id": row["user_id"],
        "app_source": row["app_source"],
        "project_type": row["project_type"],
        "title": row["title"],
        "content_type": row["content_type"],
        "size_bytes": int(row["size_bytes"]),
        "metadata": row["metadata"],
        "created_at": row["created_at"].isoformat(),
        "updated_at": row["updated_at"].isoformat(),
    }


def full(row: dict[str, Any]) -> dict[str, Any]:
    if row["content_bytes"] is not None:
        content, encoding = base64.b64encode(row["content_bytes"]).decode(), "base64"
    else:
        content, encoding = row["content_text"], "text"
    return {**summary(row), "content": content, "content_encoding": encoding}


def export_source(row: dict[str, Any]) -> ExportSource:
    return ExportSource(
        code=row["code"],
        title=row["title"],
        app_source=row["app_source"],
        project_type=row["project_type"],
        content_type=row["content_type"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        text=row["content_text"],
        data=row["content_bytes"],
    )
