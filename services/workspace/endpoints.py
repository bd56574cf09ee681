from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from services.kit.authority import authorize
from services.kit.db import Session
from services.kit.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    Unprocessable,
)
from services.kit.idempotency import key_from_request
from services.kit.openapi import STANDARD, error_responses
from services.kit.principal import CurrentPrincipal, origin_principal
from services.kit.schemas import AppName, UserId
from services.workspace import exports
from services.workspace.config import get_settings
from services.workspace.content import ALLOWED_CONTENT_TYPES, UnsupportedContentType
from services.workspace.schemas import (
    Deleted,
    Project,
    ProjectCreate,
    ProjectPage,
    ProjectSummary,
    ProjectType,
    ProjectUpdate,
    QuotaUpdate,
    Storage,
)
from services.workspace.service import Caller, Workspace, export_source, full, summary

router = APIRouter(prefix="/v1/workspace", tags=["workspace"])

Code = Annotated[str, Path(max_length=16, description="The 6-character project code")]
OwnerParam = Annotated[
    UserId | None,
    Query(description="Optional: the owner you expect; another user's project is 404"),
]

ERRORS = error_responses(
    {
        400: (
            "Malformed request, cursor or Idempotency-Key",
            [
                BadRequest("Request body is not valid JSON", code="malformed_json"),
                BadRequest("Invalid cursor", code="invalid_cursor"),
            ],
        ),
        401: "Missing or invalid credentials",
        403: (
            "Missing scope, or a user token naming another user",
            Forbidden("This principal may act only on its own user", code="wrong_user"),
        ),
        404: (
            "No such project (or not yours: the same answer)",
            NotFound("No such project", code="project_not_found", project_code="K7M2QX"),
        ),
        409: "Idempotency-Key reused with another request",
        413: (
            "`storage_limit_exceeded`: `detail` has needed/available/limit bytes",
            PayloadTooLarge(
                "Storage limit exceeded: this needs 52000 more bytes but only 20576 of"
                " 1048576 are available",
                code="storage_limit_exceeded",
                needed_bytes=52000,
                available_bytes=20576,
                used_bytes=1028000,
                limit_bytes=1048576,
            ),
        ),
        415: (
            "`content_type_not_allowed`: not text or a PNG/JPEG/GIF/WebP image",
            UnsupportedContentType(
                "Content type 'application/pdf' is not allowed",
                content_type="application/pdf",
                allowed=list(ALLOWED_CONTENT_TYPES),
            ),
        ),
        422: (
            "Invalid input (base64, title, metadata size, export format...)",
            [
                Unprocessable("Content is not valid base64", code="invalid_base64"),
                STANDARD[422],
            ],
        ),
    }
)


async def get_workspace(session: Session) -> Workspace:
    return Workspace(session, get_settings())


WorkspaceDep = Annotated[Workspace, Depends(get_workspace)]


def _caller(operation: str) -> Any:
    async def dependency(request: Request, principal: CurrentPrincipal) -> Caller:
        origin = origin_principal(request, principal)
        return Caller(principal, authorize(principal, operation, origin=origin))

    return dependency


# Who may read or write whose workspace: the authority table (services/kit/authority.py).
Reader = Annotated[Caller, Depends(_caller("workspace.read"))]
Writer = Annotated[Caller, Depends(_caller("workspace.write"))]


@router.post(
    "/projects",
    summary="Save a project",
    status_code=201,
    response_model=ProjectSummary,
    responses={
        **ERRORS,
        201: {
            "content": {
                "application/json": {
                    "example": {
                        "code": "WVXE48",
                        "user_id": "101902121794505144784",
                        "app_source": "penora",
                        "project_type": "story",
                        "title": "The Lighthouse Keeper",
                        "content_type": "text/markdown",
                        "size_bytes": 77,
                        "metadata": {},
                        "created_at": "2026-11-26T10:27:31Z",
                        "updated_at": "2026-11-26T10:27:31Z",
                    }
                }
            }
        },
    },
)
async def create_project(
    body: ProjectCreate,
    request: Request,
    response: Response,
    caller: Writer,
    workspace: WorkspaceDep,
) -> dict[str, Any]:
    """Save a project (text, base64 image or data: URL) within the owner's storage quota."""
    created = await workspace.create(caller, body, key=key_from_request(request))
    response.status_code = created.status_code
    if created.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return created.body


@router.get(
    "/projects",
    summary="List a user's projects",
    response_model=ProjectPage,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "items": [
                            {
                                "code": "WVXE48",
                                "user_id": "101902121794505144784",
                                "app_source": "penora",
                                "project_type": "story",
                                "title": "The Lighthouse Keeper",
                                "content_type": "text/markdown",
                                "size_bytes": 77,
                                "metadata": {},
                                "created_at": "2026-11-26T10:27:31Z",
                                "updated_at": "2026-11-26T10:27:31Z",
                            }
                        ],
                        "next_cursor": "MjAyNi0xMS0yNlQxMDoyNzozMVp8V1ZYRTQ4",
                    }
                }
            }
        },
    },
)
async def list_projects(
    caller: Reader,
    workspace: WorkspaceDep,
    user_id: UserId | None = None,
    app: AppName | None = None,
    type: ProjectType | None = None,  # noqa: A002 - the public query name
    q: Annotated[str | None, Query(max_length=200, description="Title contains")] = None,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ProjectPage:
    """A user's projects from every app, newest first, with filters and a cursor."""
    owner = workspace.owner(caller, user_id)
    await workspace.check_user(caller, owner)
    rows, next_cursor = await workspace.list(
        owner, app_source=app, project_type=type, q=q, cursor=cursor, limit=limit
    )
    return ProjectPage(
        items=[ProjectSummary.model_validate(summary(r)) for r in rows], next_cursor=next_cursor
    )


@router.get(
    "/projects/{code}",
    summary="One project, with its content",
    response_model=Project,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "code": "JEC99W",
                        "user_id": "101902121794505144784",
                        "app_source": "penora",
                        "project_type": "story",
                        "title": "The Lighthouse Keeper",
                        "content_type": "text/markdown",
                        "size_bytes": 89,
                        "metadata": {"words": 12},
                        "created_at": "2026-11-26T10:34:02Z",
                        "updated_at": "2026-11-26T10:34:02Z",
                        "content": "# Chapter 1\n\nThe lamp had not gone out i",
                        "content_encoding": "text",
                    }
                }
            }
        },
    },
)
async def get_project(
    code: Code, caller: Reader, workspace: WorkspaceDep, user_id: OwnerParam = None
) -> dict[str, Any]:
    """One project with its content (text, or base64 for images)."""
    return full(await workspace.visible_project(caller, code, user_id=user_id))


@router.patch(
    "/projects/{code}",
    summary="Change a project",
    response_model=ProjectSummary,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "code": "JEC99W",
                        "user_id": "101902121794505144784",
                        "app_source": "penora",
                        "project_type": "story",
                        "title": "The Lighthouse Keeper (draft 2)",
                        "content_type": "text/markdown",
                        "size_bytes": 99,
                        "metadata": {"words": 12},
                        "created_at": "2026-11-26T10:34:02Z",
                        "updated_at": "2026-11-26T10:34:02Z",
                    }
                }
            }
        },
    },
)
async def update_project(
    code: Code,
    body: ProjectUpdate,
    caller: Writer,
    workspace: WorkspaceDep,
    user_id: OwnerParam = None,
) -> dict[str, Any]:
    """Change a project's title, content and/or metadata (growth counts against the quota)."""
    return await workspace.update(caller, code, body, user_id=user_id)


@router.delete(
    "/projects/{code}",
    summary="Delete a project",
    response_model=Deleted,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "code": "XFXESC",
                        "deleted": True,
                        "size_bytes": 18,
                        "storage": {
                            "user_id": "101902121794505144784",
                            "used_bytes": 99,
                            "limit_bytes": 1048576,
                            "available_bytes": 1048477,
                            "percent": 0.01,
                            "project_count": 1,
                            "by_app": [{"app_source": "penora", "bytes": 99, "count": 1}],
                        },
                    }
                }
            }
        },
    },
)
async def delete_project(
    code: Code, caller: Writer, workspace: WorkspaceDep, user_id: OwnerParam = None
) -> dict[str, Any]:
    """Delete a project; its bytes are free again at once."""
    return await workspace.delete(caller, code, user_id=user_id)


@router.get(
    "/projects/{code}/content",
    summary="A project's raw content",
    responses={**ERRORS, 200: {"description": "The raw bytes", "content": {"*/*": {}}}},
    response_class=Response,
)
async def get_content(
    code: Code, caller: Reader, workspace: WorkspaceDep, user_id: OwnerParam = None
) -> Response:
    """The raw content with its real Content-Type (an image as bytes, text as UTF-8)."""
    project = await workspace.visible_project(caller, code, user_id=user_id)
    if project["content_bytes"] is not None:
        body, media_type = project["content_bytes"], project["content_type"]
    else:
        body = project["content_text"].encode("utf-8")
        media_type = f"{project['content_type']}; charset=utf-8"
    return Response(
        body,
        media_type=media_type,
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "private, no-store"},
    )


@router.get(
    "/projects/{code}/export",
    summary="Export a project (PDF, DOCX, text)",
    responses={
        **ERRORS,
        200: {
            "description": "The file, as an attachment",
            "content": {media: {} for media in exports.FORMATS.values()},
        },
    },
    response_class=Response,
)
async def export_project(
    code: Code,
    caller: Reader,
    workspace: WorkspaceDep,
    format: Annotated[str, Query(description="txt, pdf or docx")] = "txt",  # noqa: A002
    user_id: OwnerParam = None,
) -> Response:
    """Download a project as a TXT, PDF or DOCX file (title, timestamps, content, image)."""
    fmt = format.lower()
    if fmt not in exports.FORMATS:
        raise Unprocessable(
            f"Unknown export format {format!r}",
            code="unsupported_export_format",
            formats=list(exports.FORMATS),
        )
    project = await workspace.visible_project(caller, code, user_id=user_id)
    source = export_source(project)
    data = await run_in_threadpool(exports.render, source, fmt)
    name = exports.filename(source, fmt)
    disposition = f"attachment; filename=\"{name}\"; filename*=UTF-8''{quote(name)}"
    return Response(
        data,
        media_type=exports.FORMATS[fmt],
        headers={
            "Content-Disposition": disposition,
            "Cache-Control": "private, no-store",
        },
    )


@router.get(
    "/storage",
    summary="A user's storage use and limit",
    response_model=Storage,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "user_id": "101902121794505144784",
                        "used_bytes": 77,
                        "limit_bytes": 1048576,
                        "available_bytes": 1048499,
                        "percent": 0.01,
                        "project_count": 1,
                        "by_app": [{"app_source": "penora", "bytes": 77, "count": 1}],
                    }
                }
            }
        },
    },
)
async def get_storage(
    caller: Reader, workspace: WorkspaceDep, user_id: UserId | None = None
) -> dict[str, Any]:
    """Storage used, limit, available and percent, with bytes and counts per app."""
    owner = workspace.owner(caller, user_id)
    await workspace.check_user(caller, owner)
    return await workspace.storage(owner)


@router.put(
    "/quotas/{user_id}",
    summary="Set a user's storage limit (admin)",
    response_model=Storage,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "user_id": "101902121794505144784",
                        "used_bytes": 99,
                        "limit_bytes": 5242880,
                        "available_bytes": 5242781,
                        "percent": 0.0,
                        "project_count": 1,
                        "by_app": [{"app_source": "penora", "bytes": 99, "count": 1}],
                    }
                }
            }
        },
    },
)
async def set_quota(
    user_id: UserId, body: QuotaUpdate, principal: CurrentPrincipal, workspace: WorkspaceDep
) -> dict[str, Any]:
    """Admin: set a user's storage limit in bytes (null restores the default)."""
    authorize(principal, "workspace.quota")
    return await workspace.set_quota(user_id, body.limit_bytes)
