"""Seed 004's NanoBanana routes for old clients, in their shapes, onto the enhancement
service's native API:

    POST /api/enhance-image             {inputImageUrl, enhancementType, prompt, strength,
                                         moodboardId} -> {"success": true, "taskId": ...}
    GET  /api/enhance-image?taskId=     -> {"success": true, "task": {...}}
    GET  /api/enhance-image?limit=10    -> {"success": true, "tasks": [...]}
    GET  /api/admin/credit-stats        pools, usage, the 80 %-of-revenue budget (admin)
    POST /api/admin/refill-credits      {provider, amount} (admin)
    POST /api/background/process-tasks  `Authorization: Bearer <token>`: the pending-tasks
                                        job now; the token is checked by the enhancement
                                        service (KU_ENHANCEMENT_PROCESS_TOKEN, constant time)

Errors are the seeds' `{"success": false, "error": ...}` bodies (`CompatRoute`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from gateway.access import authenticated, client_ip
from gateway.compat import CompatRoute
from gateway.compat.errors import ERRORS
from gateway.ratelimit import rate_headers
from gateway.upstream import Upstreams, error_from_upstream
from services.kit.errors import NotFound, Unauthorized, Unprocessable
from services.kit.money import PositiveKu, milli_to_ku
from services.kit.principal import SignedPrincipal
from services.kit.schemas import Text

router = APIRouter(prefix="/api", route_class=CompatRoute, tags=["compatibility"], responses=ERRORS)
Caller = Annotated[SignedPrincipal, Depends(authenticated())]
# Seed 004 spells NanoBanana's pool "nanobanan".
PROVIDER_ALIASES = {"nanobanan": "nanobanana", "falai": "fal", "kieai": "kie"}
# What goes into an upstream path: a task id (a UUID) and a provider's name, nothing that
# could leave that path (`..`, `/`, `?`, `#`, escapes).
TASK_ID = re.compile(r"[0-9A-Fa-f-]{1,64}")
PROVIDER = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


class EnhanceImage(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "inputImageUrl": "https://example.com/image.jpg",
                    "enhancementType": "lighting",
                    "prompt": "warm golden hour lighting",
                    "strength": 0.8,
                }
            ]
        },
    )
    inputImageUrl: Text = Field(max_length=2048)  # noqa: N815 - the seed's wire names
    enhancementType: Text = "custom"  # noqa: N815
    prompt: Text = Field("", max_length=2000)
    strength: float = Field(0.8, ge=0, le=1)
    moodboardId: Text | None = Field(None, max_length=200)  # noqa: N815
    userId: Text | None = Field(None, description="For app keys: on whose behalf")  # noqa: N815


class RefillCredits(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {"provider": "nanobanana", "amount": 5000, "reference": "invoice-2026-11-nb"}
            ]
        },
    )
    provider: Text = Field(min_length=1, max_length=64)
    amount: PositiveKu
    reference: Text | None = Field(None, max_length=200)


def _upstreams(request: Request) -> Upstreams:
    return request.app.state.gateway.upstreams


def _task(t: dict[str, Any]) -> dict[str, Any]:
    error = t.get("error") or {}
    return {
        "id": t["id"],
        "status": t["status"],
        "progress": t["progress"],
        "enhancementType": t["enhancement_type"],
        "prompt": t["prompt"],
        "strength": t["strength"],
        "moodboardId": t["moodboard_id"],
        "resultUrl": t["result_url"],
        "errorMessage": error.get("message"),
        "provider": t["provider"],
        "degraded": t["degraded"],
        "creditsUsed": t["charged"] if t["settled"] else t["price"],
        "createdAt": t["created_at"],
        "completedAt": t["completed_at"],
    }


@router.post(
    "/enhance-image", summary="Submit an image for enhancement (old clients)", status_code=202
)
async def enhance_image(request: Request, body: EnhanceImage, identity: Caller) -> dict[str, Any]:
    """Submit an enhancement task (seed 004): answers with its `taskId` at once."""
    native: dict[str, Any] = {
        "image_url": body.inputImageUrl,
        "enhancement_type": body.enhancementType,
        "prompt": body.prompt,
        "strength": body.strength,
        "moodboard_id": body.moodboardId,
    }
    if body.userId:
        identity.principal.acts_for(body.userId)  # as the proxy checks the native route
        native["user_id"] = body.userId
    headers = {}
    key = request.headers.get("idempotency-key")
    if key:
        headers["Idempotency-Key"] = key
    task = await _upstreams(request).json(
        "enhancement",
        "POST",
        "/v1/enhancement/tasks",
        principal=identity,
        json=native,
        headers=headers,
    )
    return {"success": True, "taskId": task["id"], "status": task["status"], "task": _task(task)}


@router.get(
    "/enhance-image",
    summary="An enhancement task's status, or recent tasks (old clients)",
    responses={
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "success": True,
                        "task": {
                            "id": "ffa6a6b6-8be2-5527-99b4-7c99c133c693",
                            "status": "completed",
                            "progress": 100,
                            "enhancementType": "lighting",
                            "prompt": "warm golden hour lighting",
                            "strength": 0.8,
                            "moodboardId": None,
                            "resultUrl": "/v1/enhancement/tasks/ffa6a6b6-8be2-5527-99b4"
                            "-7c99c133c693/result?expires=1795682043"
                            "&sig=2576aaac5a36a62b6473e879e65c6b36",
                            "errorMessage": None,
                            "provider": "local",
                            "degraded": True,
                            "creditsUsed": 0,
                            "createdAt": "2026-11-26T10:34:02Z",
                            "completedAt": "2026-11-26T10:34:02Z",
                        },
                    }
                }
            }
        }
    },
)
async def enhancement_status(
    request: Request,
    identity: Caller,
    taskId: Annotated[Text | None, Query(max_length=64)] = None,  # noqa: N803
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
    userId: Annotated[Text | None, Query(max_length=128)] = None,  # noqa: N803
) -> dict[str, Any]:
    """A task's status (`?taskId=`), or the user's recent tasks (`?limit=`)."""
    upstreams = _upstreams(request)
    if taskId:
        if not TASK_ID.fullmatch(taskId):
            raise NotFound("No such task", code="task_not_found")
        task = await upstreams.json(
            "enhancement", "GET", f"/v1/enhancement/tasks/{taskId}", principal=identity
        )
        return {"success": True, "task": _task(task)}
    params: dict[str, Any] = {"limit": limit}
    if userId:
        identity.principal.acts_for(userId)
        params["user_id"] = userId
    page = await upstreams.json(
        "enhancement", "GET", "/v1/enhancement/tasks", principal=identity, params=params
    )
    return {"success": True, "tasks": [_task(t) for t in page["items"]]}


@router.get("/admin/credit-stats", summary="Platform credit pools and usage (admin, old clients)")
async def credit_stats(request: Request, identity: Caller) -> dict[str, Any]:
    """Platform credit pools, usage, the pool budget rule and recent alerts (admin)."""
    stats = await _upstreams(request).json(
        "enhancement", "GET", "/v1/enhancement/stats", principal=identity
    )
    return {
        "success": True,
        "creditPools": stats["pools"],
        "monthlyUsage": stats["month"],
        "dailyUsage": stats["today"],
        "budget": stats["budget"],
        "alerts": stats["alerts"],
    }


@router.post("/admin/refill-credits", summary="Refill a provider's pool (admin, old clients)")
async def refill_credits(request: Request, body: RefillCredits, identity: Caller) -> dict[str, Any]:
    """Add pre-bought credits to a provider's pool (admin)."""
    provider = PROVIDER_ALIASES.get(body.provider.lower(), body.provider.lower())
    if not PROVIDER.fullmatch(provider):
        raise NotFound("No such provider", code="unknown_provider", provider=body.provider)
    native: dict[str, Any] = {"amount": milli_to_ku(body.amount)}
    if body.reference:
        native["reference"] = body.reference
    pool = await _upstreams(request).json(
        "enhancement",
        "POST",
        f"/v1/enhancement/pools/{provider}/refill",
        principal=identity,
        json=native,
    )
    return {
        "success": True,
        "provider": pool["provider"],
        "amount": milli_to_ku(body.amount),
        "newBalance": pool["balance"],
        "pool": pool,
    }


# Public to the gateway: the background job token (a Bearer header) is the credential.
@router.post(
    "/background/process-tasks",
    summary="Run pending enhancement tasks (job token, old clients)",
    openapi_extra={"security": []},
)
async def process_tasks(
    request: Request,
    response: Response,
    authorization: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    """Run the pending-tasks job now (seed 004's cron hook), with the background job token."""
    gateway = request.app.state.gateway
    raw = {k: v for k, v in request.scope["headers"] if k == b"x-forwarded-for"}
    decision = await gateway.access.admit_anonymous(client_ip(request.scope, raw, gateway.settings))
    for name, value in rate_headers(decision):
        response.headers[name.decode()] = value.decode()
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Background job token required", code="invalid_token")
    status, body = await gateway.upstreams.call(
        "enhancement",
        "POST",
        "/v1/enhancement/background/process-tasks",
        principal=None,
        headers={"x-ku-process-token": token.strip()},
    )
    if status >= 400:
        raise error_from_upstream(status, body)
    if not isinstance(body, dict):
        raise Unprocessable("Unexpected answer", code="upstream_error")
    return {"success": True, "processed": body}
