"""The old clients' workspace routes, translated onto the workspace's native API.

`/api/unified/save-project`, `/api/unified/projects`, `/api/unified/storage-stats`,
and Penora's older cross-app routes `/api/user-projects` and `/api/project/<code>`.
Shapes follow the seeds (001, 002, 003); sizes are reported in MB as they were.
A full workspace answers 413 `{"success": false, "error": "Storage limit exceeded",
"details": "Adding 0.1MB would exceed 1MB limit ..."}`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

from gateway.compat.unified import Caller, CompatUserId
from gateway.upstream import Upstreams
from services.kit.errors import KuError, NotFound
from services.kit.principal import SignedPrincipal
from services.kit.schemas import JsonObject, Text

MB = 1024 * 1024
APPS = ("penora", "imagegene")
# Old clients get every project at once; a user's quota keeps this small.
MAX_LISTED = 1000
PAGE = 100


class SaveProject(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "user_id": "101902121794505144784",
                    "app_source": "imagegene",
                    "project_type": "ai_art",
                    "title": "Generated Landscape Art",
                    "content": "base64_image_data_or_text_content",
                    "metadata": {"style": "photorealistic", "dimensions": "1024x1024"},
                }
            ]
        },
    )
    user_id: CompatUserId
    app_source: Text | None = Field(None, description="Defaults to the calling app")
    project_type: Text | None = None
    title: Text | None = Field(None, description="Defaults to `Untitled <type>`")
    content: Text
    metadata: JsonObject | None = None


# The old clients' project listing example: one image and one story (both Penora's).
_EXAMPLE_PROJECTS = [
    {
        "code": "ZYQ3CT",
        "project_code": "ZYQ3CT",
        "title": "Harbour at dusk",
        "app_source": "penora",
        "project_type": "image",
        "content_type": "image/png",
        "size_bytes": 155,
        "size_mb": 0.0001,
        "metadata": {},
        "created_at": "2026-11-26T10:34:02Z",
        "updated_at": "2026-11-26T10:34:02Z",
    },
    {
        "code": "JEC99W",
        "project_code": "JEC99W",
        "title": "The Lighthouse Keeper (draft 2)",
        "app_source": "penora",
        "project_type": "story",
        "content_type": "text/markdown",
        "size_bytes": 99,
        "size_mb": 0.0001,
        "metadata": {"words": 12},
        "created_at": "2026-11-26T10:34:02Z",
        "updated_at": "2026-11-26T10:34:02Z",
    },
]


def _upstreams(request: Request) -> Upstreams:
    return request.app.state.gateway.upstreams


def _mb(size: int, digits: int = 2) -> float:
    return round(size / MB, digits)


def _mb_text(size: int) -> str:
    """0.1, 0.0039, 1: enough digits that a small amount never reads as 0."""
    value = size / MB
    text = f"{value:.2f}" if value >= 0.01 or value == 0 else f"{value:.4f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _project(p: dict[str, Any]) -> dict[str, Any]:
    out = {
        "code": p["code"],
        "project_code": p["code"],
        "title": p["title"],
        "app_source": p["app_source"],
        "project_type": p["project_type"],
        "content_type": p["content_type"],
        "size_bytes": p["size_bytes"],
        "size_mb": _mb(p["size_bytes"], 4),
        "metadata": p["metadata"],
        "created_at": p["created_at"],
        "updated_at": p["updated_at"],
    }
    if "content" in p:
        out["content"] = p["content"]
    return out


def _storage_stats(s: dict[str, Any]) -> dict[str, Any]:
    return {
        "used_mb": _mb(s["used_bytes"]),
        "limit_mb": _mb(s["limit_bytes"]),
        "available_mb": _mb(s["available_bytes"]),
        "usage_percentage": float(s["percent"]),
        "used_bytes": s["used_bytes"],
        "limit_bytes": s["limit_bytes"],
        "available_bytes": s["available_bytes"],
    }


def _breakdown(s: dict[str, Any]) -> dict[str, Any]:
    by_app = {a["app_source"]: a for a in s["by_app"]}
    out: dict[str, Any] = {}
    for app in APPS:
        out[f"{app}_mb"] = _mb(by_app.get(app, {}).get("bytes", 0))
    out["total_projects"] = s["project_count"]
    for app in APPS:
        out[f"{app}_projects"] = by_app.get(app, {}).get("count", 0)
    out["apps"] = {
        name: {"mb": _mb(a["bytes"]), "bytes": a["bytes"], "projects": a["count"]}
        for name, a in by_app.items()
    }
    return out


def _storage_full(exc: KuError) -> JSONResponse:
    detail = exc.detail or {}
    needed = int(detail.get("needed_bytes", 0))
    limit = int(detail.get("limit_bytes", 0))
    available = int(detail.get("available_bytes", 0))
    body = {
        "success": False,
        "error": "Storage limit exceeded",
        "details": (
            f"Adding {_mb_text(needed)}MB would exceed {_mb_text(limit)}MB limit"
            f" ({_mb_text(available)}MB available)"
        ),
        "code": exc.code,
        "storage_stats": {
            "used_mb": _mb(int(detail.get("used_bytes", 0))),
            "limit_mb": _mb(limit),
            "available_mb": _mb(available),
        },
    }
    return JSONResponse(body, status_code=413)


async def _storage(upstreams: Upstreams, identity: SignedPrincipal, user_id: str) -> Any:
    return await upstreams.json(
        "workspace", "GET", "/v1/workspace/storage", principal=identity, params={"user_id": user_id}
    )


async def _all_projects(
    upstreams: Upstreams, identity: SignedPrincipal, user_id: str, app: str | None
) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    params: dict[str, Any] = {"user_id": user_id, "limit": PAGE}
    if app:
        params["app"] = app
    while len(items) < MAX_LISTED:
        page = await upstreams.json(
            "workspace", "GET", "/v1/workspace/projects", principal=identity, params=params
        )
        items += page["items"]
        if not page["next_cursor"]:
            break
        params["cursor"] = page["next_cursor"]
    return [_project(p) for p in items[:MAX_LISTED]]


async def _project_list(
    request: Request, identity: SignedPrincipal, user_id: str, app: str | None
) -> dict[str, Any]:
    identity.principal.acts_for(user_id)
    upstreams = _upstreams(request)
    projects = await _all_projects(upstreams, identity, user_id, app)
    stats = await _storage(upstreams, identity, user_id)
    out: dict[str, Any] = {"success": True, "all_projects": projects}
    for name in APPS:
        out[f"{name}_projects"] = [p for p in projects if p["app_source"] == name]
    out["total_count"] = len(projects)
    for name in APPS:
        out[f"{name}_count"] = len(out[f"{name}_projects"])
    out["storage_stats"] = _storage_stats(stats)
    return out


def register(router: APIRouter) -> None:
    @router.post("/save-project", summary="Save a project to the shared workspace (old clients)")
    async def save_project(request: Request, body: SaveProject, identity: Caller) -> Any:
        """Save a project (text, base64 image or data: URL) to the user's shared workspace."""
        identity.principal.acts_for(body.user_id)
        native: dict[str, Any] = {
            "user_id": body.user_id,
            "title": body.title
            if body.title is not None
            else f"Untitled {body.project_type or 'project'}",
            "content": body.content,
            "metadata": body.metadata or {},
        }
        if body.app_source:
            native["app_source"] = body.app_source.strip().lower()
        if body.project_type:
            native["project_type"] = body.project_type.strip().lower()
        headers = {}
        key = request.headers.get("idempotency-key")
        if key:
            headers["Idempotency-Key"] = key
        try:
            project = await _upstreams(request).json(
                "workspace",
                "POST",
                "/v1/workspace/projects",
                principal=identity,
                json=native,
                headers=headers,
            )
        except KuError as exc:
            if exc.code == "storage_limit_exceeded":
                return _storage_full(exc)
            raise
        return {
            "success": True,
            "project_code": project["code"],
            "title": project["title"],
            "size_mb": _mb(project["size_bytes"], 4),
            "size_bytes": project["size_bytes"],
            "app_source": project["app_source"],
            "project_type": project["project_type"],
            "content_type": project["content_type"],
            "created_at": project["created_at"],
        }

    @router.get(
        "/projects",
        summary="A user's projects from every app (old clients)",
        responses={
            200: {
                "content": {
                    "application/json": {
                        "example": {
                            "success": True,
                            "all_projects": _EXAMPLE_PROJECTS,
                            "penora_projects": _EXAMPLE_PROJECTS,
                            "imagegene_projects": [],
                            "total_count": 2,
                            "penora_count": 2,
                            "imagegene_count": 0,
                            "storage_stats": {
                                "used_mb": 0.0,
                                "limit_mb": 5.0,
                                "available_mb": 5.0,
                                "usage_percentage": 0.0,
                                "used_bytes": 254,
                                "limit_bytes": 5242880,
                                "available_bytes": 5242626,
                            },
                        }
                    }
                }
            }
        },
    )
    async def projects(
        request: Request,
        identity: Caller,
        user_id: Annotated[CompatUserId, Query()],
        app: Annotated[Text | None, Query(max_length=64)] = None,
    ) -> dict[str, Any]:
        """A user's projects from every app (or one, with `app`), newest first, with storage."""
        return await _project_list(request, identity, user_id, app.strip().lower() if app else None)

    @router.get(
        "/storage-stats",
        summary="A user's shared storage (old clients)",
        responses={
            200: {
                "content": {
                    "application/json": {
                        "example": {
                            "success": True,
                            "user_id": "101902121794505144784",
                            "storage_stats": {
                                "used_mb": 0.0,
                                "limit_mb": 5.0,
                                "available_mb": 5.0,
                                "usage_percentage": 0.0,
                                "used_bytes": 254,
                                "limit_bytes": 5242880,
                                "available_bytes": 5242626,
                            },
                            "breakdown": {
                                "penora_mb": 0.0,
                                "imagegene_mb": 0.0,
                                "total_projects": 2,
                                "penora_projects": 2,
                                "imagegene_projects": 0,
                                "apps": {"penora": {"mb": 0.0, "bytes": 254, "projects": 2}},
                            },
                        }
                    }
                }
            }
        },
    )
    async def storage_stats(
        request: Request, identity: Caller, user_id: Annotated[CompatUserId, Query()]
    ) -> dict[str, Any]:
        """Shared storage: used, limit, available, percent, and the split per app."""
        identity.principal.acts_for(user_id)
        stats = await _storage(_upstreams(request), identity, user_id)
        return {
            "success": True,
            "user_id": user_id,
            "storage_stats": _storage_stats(stats),
            "breakdown": _breakdown(stats),
        }

    # Penora's older cross-app routes live outside /api/unified: same route class
    # (seed-shaped errors), added to the compat router's routes without its prefix.
    legacy = APIRouter(
        route_class=router.route_class, tags=["compatibility"], responses=router.responses
    )

    @legacy.get("/api/user-projects", summary="A user's projects (old ImageGene clients)")
    async def user_projects(
        request: Request,
        identity: Caller,
        user_id: Annotated[CompatUserId, Query()],
        app: Annotated[Text | None, Query(max_length=64)] = None,
    ) -> dict[str, Any]:
        """A user's projects for a dropdown in another app (older Penora route)."""
        app_name = app.strip().lower() if app else None
        listed = await _project_list(request, identity, user_id, app_name)
        return {
            "success": True,
            "user_id": user_id,
            "projects": listed["all_projects"],
            "total_count": listed["total_count"],
            "storage_stats": listed["storage_stats"],
        }

    @legacy.get(
        "/api/project/{code}",
        summary="One project with its content (old clients)",
        responses={
            200: {
                "content": {
                    "application/json": {
                        "example": {
                            "success": True,
                            "project": {
                                **_EXAMPLE_PROJECTS[1],
                                "content": "# Chapter 1\n\nThe lamp had not gone out i",
                            },
                        }
                    }
                }
            }
        },
    )
    async def project(
        request: Request,
        identity: Caller,
        code: Text,
        user_id: Annotated[CompatUserId | None, Query()] = None,
    ) -> dict[str, Any]:
        """One project with its content (text, or base64 for images) by its code."""
        if not code.isascii() or not code.isalnum() or len(code) > 16:
            raise NotFound("No such project", code="project_not_found")
        if user_id:
            identity.principal.acts_for(user_id)  # as the proxy checks the native route
        params = {"user_id": user_id} if user_id else None
        found = await _upstreams(request).json(
            "workspace",
            "GET",
            f"/v1/workspace/projects/{code}",
            principal=identity,
            params=params,
        )
        return {"success": True, "project": _project(found)}

    router.routes.extend(legacy.routes)
