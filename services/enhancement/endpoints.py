from __future__ import annotations

import hmac
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response

from services.enhancement.schemas import (
    AlertPage,
    AllowanceOut,
    PoolOut,
    ProcessResult,
    RefillIn,
    Task,
    TaskCreate,
    TaskPage,
    TierIn,
)
from services.enhancement.service import Enhancer, Submission
from services.enhancement.storage import verify_link
from services.kit.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    PaymentRequired,
    Unauthorized,
    Unprocessable,
)
from services.kit.idempotency import key_from_request
from services.kit.openapi import STANDARD, error_responses
from services.kit.principal import (
    PRINCIPAL_HEADER,
    CurrentPrincipal,
    Principal,
    derived_secret,
    get_principal,
)
from services.kit.schemas import UserId

router = APIRouter(prefix="/v1/enhancement", tags=["enhancement"])

DECLARED: dict[int, Any] = {
    400: (
        "Malformed request or Idempotency-Key",
        [
            STANDARD[400],
            BadRequest("A multipart submission needs an `image` file", code="image_required"),
        ],
    ),
    401: "Missing or invalid credentials",
    402: (
        "`insufficient_credits`: the price could not be held",
        PaymentRequired(available=0.5, required=2),
    ),
    403: (
        "Missing scope, another user, or another app's lane",
        [
            Forbidden("Missing scope: enhance", code="missing_scope"),
            Forbidden("A caller charges only in its own app's name", code="wrong_app"),
        ],
    ),
    404: (
        "No such task (or not yours: the same answer)",
        [
            NotFound("No such task", code="task_not_found"),
            NotFound("The task has no result", code="no_result"),
        ],
    ),
    409: (
        "Idempotency-Key reused with another request",
        Conflict("Idempotency-Key reused with another request", code="idempotency_conflict"),
    ),
    413: (
        "`input_too_large`: the image is larger than allowed",
        PayloadTooLarge(
            "The image is larger than allowed", code="input_too_large", max_bytes=10485760
        ),
    ),
    422: (
        "Invalid input; `unsafe_url` (private, loopback, metadata, non-http), "
        "`image_too_large` (pixels), `unsupported_image`, `invalid_image`, "
        "`content_type_mismatch` (the URL served no image type), `input_unreachable`",
        [
            Unprocessable(
                "The URL points to a private or reserved address",
                code="unsafe_url",
                host="169.254.169.254",
            ),
            Unprocessable(
                "The image has too many pixels",
                code="image_too_large",
                width=12000,
                height=9000,
                max_pixels=40000000,
            ),
            Unprocessable(
                "Only PNG, JPEG, WebP and GIF images are accepted", code="unsupported_image"
            ),
            Unprocessable("The input is not a readable image", code="invalid_image"),
            Unprocessable(
                "The URL did not serve an image content type",
                code="content_type_mismatch",
                content_type="text/html",
            ),
            Unprocessable(
                "The image host does not resolve",
                code="input_unreachable",
                host="images.example.com",
            ),
        ],
    ),
}
ERRORS = error_responses(DECLARED)
RESULT_ERRORS = error_responses(
    {
        **DECLARED,
        403: (
            "`link_expired` or `bad_signature`: the signed link is not valid (without a link: "
            "a missing scope)",
            [
                Forbidden("The result link has expired", code="link_expired"),
                Forbidden("The result link is not valid", code="bad_signature"),
                Forbidden("Missing scope: enhance", code="missing_scope"),
            ],
        ),
    }
)

UPLOAD_BODY = {
    "requestBody": {
        "content": {
            # Inline: the route reads its body itself, so FastAPI adds no TaskCreate component.
            "application/json": {"schema": TaskCreate.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "enhancement_type"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "enhancement_type": {"type": "string"},
                        "prompt": {"type": "string"},
                        "strength": {"type": "number"},
                        "moodboard_id": {"type": "string"},
                        "user_id": {"type": "string"},
                        "app": {"type": "string"},
                        "save_to_workspace": {"type": "boolean"},
                    },
                },
                "example": {
                    "image": "(the PNG, JPEG, WebP or GIF file)",
                    "enhancement_type": "background",
                    "prompt": "a plain white studio background",
                    "strength": 0.6,
                },
            },
        },
        "required": True,
    }
}


async def get_enhancer(request: Request) -> Enhancer:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a hop per request.
    return request.app.state.enhancer


EnhancerDep = Annotated[Enhancer, Depends(get_enhancer)]


async def _submission(request: Request) -> Submission:
    content_type = request.headers.get("content-type", "")
    upload: bytes | None = None
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        fields: dict[str, Any] = {}
        for name, value in form.multi_items():
            if name == "image" and not isinstance(value, str):
                upload = await value.read()
            elif isinstance(value, str):
                fields[name] = value
        if upload is None:
            raise BadRequest("A multipart submission needs an `image` file", code="image_required")
    else:
        try:
            fields = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            raise BadRequest("Request body is not valid JSON", code="malformed_json") from None
        if not isinstance(fields, dict):
            raise BadRequest("Request body must be a JSON object", code="malformed_json")
    try:
        body = TaskCreate.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e.get("loc", ()))} for e in exc.errors()]
        ) from None
    return Submission(
        enhancement_type=body.enhancement_type,
        prompt=body.prompt,
        strength=body.strength,
        moodboard_id=body.moodboard_id,
        user_id=body.user_id,
        app=body.app,
        save_to_workspace=body.save_to_workspace,
        image_url=body.image_url,
        project_code=body.project_code,
        upload=upload,
    )


@router.post(
    "/tasks",
    summary="Submit an image for enhancement",
    status_code=202,
    response_model=Task,
    responses={**ERRORS, 200: {"description": "A replay of an earlier submission"}},
    openapi_extra=UPLOAD_BODY,
)
async def submit_task(
    request: Request, principal: CurrentPrincipal, enhancer: EnhancerDep
) -> Response:
    """Submit an image (URL, multipart upload or workspace project) for enhancement; its
    price is held now, captured on success and released on failure."""
    principal.require_scope("enhance")
    submission = await _submission(request)
    task, created = await enhancer.submit(
        principal,
        submission,
        origin=request.headers.get(PRINCIPAL_HEADER),
        idempotency_key=key_from_request(request),
    )
    body = Task.model_validate(enhancer.render(task)).model_dump(mode="json")
    headers = {} if created else {"Idempotent-Replayed": "true"}
    return JSONResponse(body, status_code=202 if created else 200, headers=headers)


@router.get(
    "/tasks",
    summary="A user's enhancement tasks, newest first",
    response_model=TaskPage,
    responses=ERRORS,
)
async def list_tasks(
    principal: CurrentPrincipal,
    enhancer: EnhancerDep,
    user_id: UserId | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> dict[str, Any]:
    """A user's recent tasks, newest first (an app key sees the tasks made through it)."""
    rows = await enhancer.recent(principal, user_id, limit)
    return {"items": [enhancer.render(r) for r in rows]}


@router.get(
    "/tasks/{task_id}", summary="One enhancement task", response_model=Task, responses=ERRORS
)
async def get_task(
    task_id: str, principal: CurrentPrincipal, enhancer: EnhancerDep
) -> dict[str, Any]:
    """A task: status, progress, provider, price and charge, result link, error."""
    return enhancer.render(await enhancer.visible(principal, task_id))


async def optional_principal(request: Request) -> Principal | None:
    """The request's principal, or None when it came with none (a signed result link
    through the gateway carries no credentials)."""
    if not request.headers.get(PRINCIPAL_HEADER):
        return None
    return await get_principal(request)


@router.get(
    "/tasks/{task_id}/result",
    summary="An enhanced image",
    responses={**RESULT_ERRORS, 200: {"content": {"image/png": {}}, "description": "The image"}},
)
async def get_result(
    task_id: str,
    enhancer: EnhancerDep,
    principal: Annotated[Principal | None, Depends(optional_principal)],
    expires: int | None = None,
    sig: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """The result image of a completed task. With `expires` and `sig` (the task's
    `result_url`), the link itself is the credential: anyone holding it gets the image
    until it expires, no key or token needed (e.g. an `<img src>`); an expired or altered
    link is 403. Without them, only the task's owner (404 for anyone else)."""
    if expires is not None or sig is not None:
        verify_link(derived_secret("enhancement", "result-links"), task_id, expires or 0, sig or "")
        task = await enhancer.by_id(task_id)
    elif principal is None:
        raise Unauthorized("Missing internal principal", code="missing_principal")
    else:
        task = await enhancer.visible(principal, task_id)
    if task["status"] != "completed" or not task["result_key"] or task["result_deleted_at"]:
        raise NotFound("The task has no result", code="no_result")
    data = await enhancer.storage.get(task["result_key"])
    if data is None:
        raise NotFound("The result is gone", code="no_result")
    return Response(
        data,
        media_type=task["result_content_type"] or "image/png",
        headers={"Cache-Control": "private, max-age=3600"},
    )


# -- admin ----------------------------------------------------------------------------


@router.get(
    "/pools",
    summary="Provider credit pools (admin)",
    response_model=list[PoolOut],
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": [
                        {
                            "provider": "fal",
                            "balance": 0,
                            "level": 0,
                            "consumed": 0,
                            "cost_per_call": 39,
                            "percent_left": 0.0,
                            "low": True,
                            "breaker": "closed",
                            "active": False,
                        }
                    ]
                }
            }
        },
    },
)
async def list_pools(principal: CurrentPrincipal, enhancer: EnhancerDep) -> list[dict[str, Any]]:
    """The platform's credit pool per provider, with breaker state (admin)."""
    principal.require_scope("admin")
    return await enhancer.pool_view()


@router.post(
    "/pools/{provider}/refill",
    summary="Refill a provider's pool (admin)",
    response_model=PoolOut,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "provider": "fal",
                        "balance": 5000,
                        "level": 5000,
                        "consumed": 0,
                        "cost_per_call": 39,
                        "percent_left": 100.0,
                        "low": False,
                        "breaker": "closed",
                        "active": True,
                    }
                }
            }
        },
    },
)
async def refill_pool(
    provider: str, body: RefillIn, principal: CurrentPrincipal, enhancer: EnhancerDep
) -> dict[str, Any]:
    """Add pre-bought credits to a provider's pool (admin; idempotent by `reference`)."""
    principal.require_scope("admin")
    await enhancer.refill(provider, body.amount, body.reference)
    view = {p["provider"]: p for p in await enhancer.pool_view()}
    return view[provider]


@router.get(
    "/stats",
    summary="Pools, usage and the pool budget (admin)",
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "pools": [
                            {
                                "provider": "fal",
                                "balance": 5000,
                                "level": 5000,
                                "consumed": 0,
                                "cost_per_call": 39,
                                "percent_left": 100.0,
                                "low": False,
                                "breaker": "closed",
                                "active": True,
                            }
                        ],
                        "month": {
                            "completed": 0,
                            "failed": 0,
                            "degraded": 0,
                            "submitted": 0,
                            "charged_milli": 0,
                            "provider_cost_milli": 0,
                        },
                        "today": {
                            "completed": 0,
                            "failed": 0,
                            "degraded": 0,
                            "submitted": 0,
                            "charged_milli": 0,
                            "provider_cost_milli": 0,
                        },
                        "budget": {
                            "month": "2026-11",
                            "pool_budget_percent": 80,
                            "source": "billing",
                            "available": True,
                            "revenue": [
                                {
                                    "currency": "USD",
                                    "payments": 2,
                                    "revenue_minor": 400,
                                    "pool_budget_minor": 320,
                                }
                            ],
                        },
                        "alerts": [],
                    }
                }
            }
        },
    },
)
async def credit_stats(principal: CurrentPrincipal, enhancer: EnhancerDep) -> dict[str, Any]:
    """Pools, this month's and today's usage, the pool budget rule, recent alerts (admin)."""
    principal.require_scope("admin")
    stats = await enhancer.credit_stats()
    stats["pools"] = [PoolOut.model_validate(p).model_dump(mode="json") for p in stats["pools"]]
    return stats


@router.get(
    "/alerts", summary="Enhancement alerts (admin)", response_model=AlertPage, responses=ERRORS
)
async def list_alerts(
    principal: CurrentPrincipal,
    enhancer: EnhancerDep,
    kind: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> dict[str, Any]:
    """Stored alerts, newest first (admin)."""
    principal.require_scope("admin")
    from services.enhancement.repository import Repository

    async with enhancer.uow() as session:
        return {"items": await Repository(session).alerts(limit, kind)}


@router.put(
    "/tiers/{user_id}",
    summary="Set a user's enhancement tier (admin)",
    response_model=AllowanceOut,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "user_id": "101902121794505144784",
                        "tier": "pro",
                        "period": "2026-11",
                        "included": 25,
                        "granted": 10,
                        "used": 0,
                        "remaining": 25,
                    }
                }
            }
        },
    },
)
async def set_tier(
    user_id: UserId, body: TierIn, principal: CurrentPrincipal, enhancer: EnhancerDep
) -> dict[str, Any]:
    """Set a user's subscription tier (free, plus, pro): its monthly included enhancements."""
    principal.require_scope("admin")
    await enhancer.set_tier(user_id, body.tier)
    return await enhancer.allowance(user_id)


@router.get(
    "/allowance",
    summary="A user's included enhancements this month",
    response_model=AllowanceOut,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "user_id": "101902121794505144784",
                        "tier": "free",
                        "period": "2026-11",
                        "included": 0,
                        "granted": 0,
                        "used": 0,
                        "remaining": 0,
                    }
                }
            }
        },
    },
)
async def get_allowance(
    request: Request,
    principal: CurrentPrincipal,
    enhancer: EnhancerDep,
    user_id: UserId | None = None,
) -> dict[str, Any]:
    """A user's included enhancements this month: the tier's count, the allowance the
    ledger granted for the month (units, not Ku), used and remaining."""
    principal.require_scope("enhance")
    owner = user_id or principal.user_id
    if not owner:
        raise BadRequest("user_id is required for app keys", code="user_id_required")
    await enhancer.check_reader(principal, owner, request.headers.get(PRINCIPAL_HEADER))
    return await enhancer.allowance(owner)


@router.post(
    "/process-pending",
    summary="Run pending enhancement tasks now (admin)",
    response_model=ProcessResult,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {"example": {"failed_overdue": 0, "settled": 0, "enqueued": 0}}
            }
        },
    },
)
async def process_pending(principal: CurrentPrincipal, enhancer: EnhancerDep) -> dict[str, int]:
    """Run the pending-tasks job now: fail overdue tasks, settle, re-enqueue (admin)."""
    principal.require_scope("admin")
    return await enhancer.run_pending(min_age_seconds=0)


@router.post(
    "/background/process-tasks",
    summary="Run pending tasks (scheduler token)",
    response_model=ProcessResult,
    responses=ERRORS,
)
async def process_with_token(
    enhancer: EnhancerDep,
    x_ku_process_token: Annotated[str | None, Header()] = None,
) -> dict[str, int]:
    """The pending-tasks job for seed 004's cron hook, authorized by the background job
    token (`KU_ENHANCEMENT_PROCESS_TOKEN`, compared in constant time) instead of a key."""
    expected = enhancer.settings.enhancement_process_token
    given = x_ku_process_token or ""
    if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized("Invalid background job token", code="invalid_token")
    return await enhancer.run_pending(min_age_seconds=0)
