from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel

from services.kit.authority import Permit, authorize
from services.kit.db import Session
from services.kit.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    KuError,
    NotFound,
    PaymentRequired,
    ServiceUnavailable,
    Unprocessable,
)
from services.kit.front import HotRoute, hot, hot_query
from services.kit.idempotency import key_from_request, request_hash
from services.kit.openapi import STANDARD, error_responses
from services.kit.principal import CurrentPrincipal, Principal, origin_principal
from services.kit.schemas import AppName, UserId, rename_milli
from services.ledger.config import get_settings
from services.ledger.repository import BalanceReader, LedgerRepository
from services.ledger.schemas import (
    Account,
    AccountCreate,
    Balance,
    BatchIn,
    BatchOut,
    CaptureIn,
    Debit,
    DebitCreate,
    Grant,
    GrantCreate,
    HoldCreate,
    HoldOut,
    HoldResult,
    Refund,
    RefundCreate,
    ReleaseIn,
    TransactionKind,
    TransactionOut,
    TransactionPage,
    Usage,
    UsageRow,
)
from services.ledger.service import Keys, Ledger, Outcome, idempotency_key, result_error

router = APIRouter(prefix="/v1/ledger", tags=["ledger"], route_class=HotRoute)


USER = "101902121794505144784"
HOLD = "4f9c2b1e-8d3a-4c6e-9f1b-2a7d5e8c0b34"
ERRORS = error_responses(
    {
        400: (
            "Malformed request or missing Idempotency-Key",
            [
                BadRequest(
                    "Send an Idempotency-Key header or a reference so a retry cannot charge twice",
                    code="idempotency_key_required",
                ),
                STANDARD[400],
            ],
        ),
        401: "Missing or invalid credentials",
        403: (
            "Missing scope, or another user's data",
            [
                Forbidden("Missing scope: ledger:write", code="missing_scope"),
                Forbidden("This principal may act only on its own user", code="wrong_user"),
                Forbidden("This hold belongs to someone else", code="not_your_hold"),
            ],
        ),
        404: (
            "Unknown user, hold or transaction",
            [
                STANDARD[404],
                NotFound("No such hold", code="hold_not_found"),
                NotFound("No such transaction", code="transaction_not_found"),
            ],
        ),
        409: (
            "Idempotency-Key reused with another request, or hold already resolved",
            [
                Conflict(
                    "This idempotency key or reference was used with a different request",
                    code="idempotency_key_reused",
                ),
                Conflict(
                    "The hold was already released",
                    code="hold_already_released",
                    # The hold as the ledger stores it (amounts in milli-Ku).
                    hold={
                        "id": HOLD,
                        "user_id": USER,
                        "app": "penora",
                        "owner": "app:penora",
                        "amount_milli": 12500,
                        "captured_milli": 0,
                        "clawed_milli": 0,
                        "status": "released",
                        "reference": "job-8812",
                        "description": "Chapter 3 draft",
                        "expires_at": "2026-11-26T10:15:00+00:00",
                        "created_at": "2026-11-26T10:00:00+00:00",
                        "resolved_at": "2026-11-26T10:02:11+00:00",
                    },
                ),
            ],
        ),
        422: (
            "Invalid input (amount, capture above hold, ...)",
            [
                STANDARD[422],
                Unprocessable(
                    "Cannot capture more than is held",
                    code="capture_exceeds_hold",
                    held=12.5,
                    requested=15,
                ),
            ],
        ),
        503: (
            "The ledger's database is unavailable: retry with the same Idempotency-Key",
            ServiceUnavailable(
                "The ledger's database is unavailable; retry with the same key",
                code="ledger_unavailable",
            ),
        ),
    }
)
INSUFFICIENT = (
    "`insufficient_credits`: `detail.available` says how much there is",
    PaymentRequired(available=3.5, required=5),
)


async def get_ledger(request: Request) -> Ledger:
    return request.app.state.ledger


LedgerDep = Annotated[Ledger, Depends(get_ledger)]


def _ledger(request: Request) -> Ledger:
    """The hot routes read the ledger off the app directly: a FastAPI dependency costs a
    dependency solve per request (see docs/ledger.md "The hot path")."""
    return request.app.state.ledger


def _permit(
    operation: str,
    principal: Principal,
    request: Request,
    *,
    app: str | None = None,
    reason: str | None = None,
) -> Permit:
    """The authority table's answer (services/kit/authority.py, docs/ledger.md)."""
    origin = origin_principal(request, principal)
    return authorize(principal, operation, origin=origin, app=app, reason=reason)


async def _may_read(
    principal: Principal, request: Request, session: Session, user_id: str
) -> Permit:
    """Reads: the table, then whether this user is the caller's to read (same session)."""
    permit = _permit("ledger.read", principal, request)
    await LedgerRepository(session).check_user(permit, user_id)
    return permit


def _respond(outcome: Outcome, model: type[BaseModel]) -> Response:
    """The route's response, serialized once by pydantic straight to JSON bytes: the
    same validation and wire form as FastAPI's response_model path (which stays on the
    route for the OpenAPI), without its second encoding pass and sub-response."""
    return model_response(
        outcome.status_code, rename_milli(outcome.body), model, replayed=outcome.replayed
    )


def model_response(
    status: int, body: dict[str, Any], model: type[BaseModel], *, replayed: bool = False
) -> Response:
    """`body` validated by `model` and written as its JSON, with `Idempotent-Replayed`
    on a replay."""
    content = model.model_validate(body).model_dump_json()
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    return Response(content, status, headers, media_type="application/json")


@router.get(
    "/balance",
    summary="A user's balance, by source, with the next expiry",
    response_model=Balance,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "user_id": "101902121794505144784",
                        "available": 75,
                        "held": 0,
                        "debt": 0,
                        "total": 75,
                        "by_source": [
                            {"source": "welcome", "available": 50},
                            {"source": "promo", "available": 25},
                        ],
                        "next_expiry": {"amount": 25, "at": "2027-01-31T00:00:00Z"},
                    }
                }
            }
        },
    },
)
@hot_query(user_id=UserId)
async def get_balance(user_id: UserId, principal: CurrentPrincipal, request: Request) -> Response:
    """A user's spendable, held and total credit, per source, with the next expiry."""
    permit = _permit("ledger.read", principal, request)
    # The link check rides on the balance statement (shared with the other reads in
    # flight, on the committer's pool); the table's answer is applied before anything
    # is shown.
    app = permit.users[7:] if permit.users.startswith("linked:") else None
    reader: BalanceReader = request.app.state.balances
    found = await reader.read(user_id, app)
    permit.check_user(user_id, found["linked"])
    if not found["found"]:
        raise NotFound("No ledger account for this user", code="unknown_user", user_id=user_id)
    sources = found["sources"]
    available = sum(int(s["amount_milli"]) for s in sources)
    expiry = found["next_expiry"]
    # One validation of the whole answer (not one model per source): the same fields,
    # types and JSON as building each model.
    balance = Balance.model_validate(
        {
            "user_id": user_id,
            "available": available,
            "held": found["held_milli"],
            "debt": found["debt_milli"],
            "total": available + found["held_milli"],
            "by_source": [{"source": s["source"], "available": s["amount_milli"]} for s in sources],
            "next_expiry": {"at": expiry["at"], "amount": expiry["amount_milli"]}
            if expiry
            else None,
        }
    )
    return Response(balance.model_dump_json(), media_type="application/json")


@router.post(
    "/accounts",
    summary="Open a user's account (with the welcome credits)",
    response_model=Account,
    responses={
        **ERRORS,
        200: {
            "description": "The account was already open; nothing changed",
            "content": {
                "application/json": {
                    "example": {
                        "user_id": "101902121794505144784",
                        "created": False,
                        "available": 37.5,
                        "held": 2.5,
                    }
                }
            },
        },
        201: {
            "description": "Opened, with the welcome credits",
            "content": {
                "application/json": {
                    "example": {
                        "user_id": "101902121794505144784",
                        "created": True,
                        "available": 50,
                        "held": 0,
                    }
                }
            },
        },
    },
)
async def open_account(
    body: AccountCreate,
    principal: CurrentPrincipal,
    request: Request,
    ledger: LedgerDep,
    response: Response,
) -> dict[str, Any]:
    """Open a user's account; with `welcome`, grant the welcome credits once per user
    (or, from an admin, `initial_credits` instead: still one grant per user)."""
    permit = _permit("ledger.account.open", principal, request)
    audit = None
    if body.initial_credits is not None:
        if permit.kind != "admin":
            raise Forbidden("Only an admin sets initial credits", code="forbidden")
        # As authorize() asks of every admin money operation: a reason that says something.
        if not body.reason or not body.reason.strip():
            raise Unprocessable("Initial credits need a reason", code="reason_required")
        audit = {"actor": principal.who, "reason": body.reason.strip()}
        amount = body.initial_credits
    else:
        amount = get_settings().welcome_credits_milli if body.welcome else 0
    outcome = await ledger.open_account(body.user_id, amount, audit=audit)
    body_out = rename_milli(outcome.body)
    response.status_code = 201 if body_out.get("created") else 200
    return body_out


@router.post(
    "/grants",
    summary="Grant credits to a user",
    status_code=201,
    response_model=Grant,
    responses={
        **ERRORS,
        201: {
            "content": {
                "application/json": {
                    "example": {
                        "grant_id": 2,
                        "transaction_id": 10,
                        "user_id": "101902121794505144784",
                        "source": "promo",
                        "amount": 25,
                        "expires_at": "2027-01-31T00:00:00Z",
                        "reference": "promo-launch-week",
                        "created_at": "2026-11-26T10:27:31Z",
                        "available": 62.15,
                        "held": 0,
                    }
                }
            }
        },
    },
)
@hot(GrantCreate)
async def create_grant(
    body: GrantCreate,
    request: Request,
    principal: CurrentPrincipal,
) -> Response:
    """Add credit to a user as a grant (a lot with a source, optional expiry and priority)."""
    permit = _permit("ledger.grant", principal, request, reason=body.reason)
    op, natural = _grant_op(body, permit)
    outcome = await _ledger(request).execute(op, principal, key=idempotency_key(request, natural))
    return _respond(outcome, Grant)


def _grant_op(body: GrantCreate, permit: Permit) -> tuple[dict[str, Any], str | None]:
    """The grant's operation and natural key (the route's and a batch item's)."""
    if permit.kind == "service" and body.source != "promo":
        # A service's lane: allowances it hands out (expiring promo-like credit) only.
        raise Forbidden("A service may grant only promotional allowances", code="forbidden")
    op = {
        "op": "grant",
        "user_id": body.user_id,
        "amount": body.amount,
        "source": body.source,
        "expires_at": body.expires_at.isoformat() if body.expires_at else None,
        "priority": body.priority,
        "reference": body.reference,
        "description": body.description,
        "app": permit.lane,
        "auth": permit.as_sql(),
    }
    natural = f"grant:{body.user_id}:{body.source}:{body.reference}" if body.reference else None
    return op, natural


@router.post(
    "/debits",
    summary="Charge a user at once",
    status_code=201,
    response_model=Debit,
    responses={
        **ERRORS,
        **error_responses({402: INSUFFICIENT}),
        201: {
            "content": {
                "application/json": {
                    "example": {
                        "transaction_id": 2,
                        "user_id": "101902121794505144784",
                        "app": "penora",
                        "amount": 4.25,
                        "description": "One image, 1024x1024",
                        "reference": "img-8812",
                        "created_at": "2026-11-26T10:27:31Z",
                        "available": 45.75,
                        "held": 0,
                    }
                }
            }
        },
    },
)
@hot(DebitCreate)
async def create_debit(
    body: DebitCreate,
    request: Request,
    principal: CurrentPrincipal,
) -> Response:
    """Spend credit at once (one-shot). Retries with the same key or reference replay."""
    permit = _permit("ledger.debit", principal, request, app=body.app, reason=body.reason)
    op, natural = _debit_op(body, permit)
    outcome = await _ledger(request).execute(op, principal, key=idempotency_key(request, natural))
    return _respond(outcome, Debit)


def _debit_op(body: DebitCreate, permit: Permit) -> tuple[dict[str, Any], str | None]:
    app = permit.lane or "unknown"
    op = {
        "op": "debit",
        "user_id": body.user_id,
        "amount": body.amount,
        "app": app,
        "description": body.description,
        "reference": body.reference,
        "auth": permit.as_sql(),
    }
    natural = f"debit:{app}:{body.user_id}:{body.reference}" if body.reference else None
    return op, natural


@router.post(
    "/holds",
    summary="Hold credits for a job",
    status_code=201,
    response_model=HoldResult,
    responses={**ERRORS, **error_responses({402: INSUFFICIENT})},
)
@hot(HoldCreate)
async def create_hold(
    body: HoldCreate,
    request: Request,
    principal: CurrentPrincipal,
) -> Response:
    """Reserve credit for work about to run; capture or release it later, or it expires."""
    permit = _permit("ledger.reserve", principal, request, app=body.app, reason=body.reason)
    op, natural = _hold_op(body, permit)
    outcome = await _ledger(request).execute(op, principal, key=idempotency_key(request, natural))
    return _respond(outcome, HoldResult)


def _hold_op(body: HoldCreate, permit: Permit) -> tuple[dict[str, Any], str | None]:
    app = permit.lane or "unknown"
    op = {
        "op": "reserve",
        "user_id": body.user_id,
        "amount": body.amount,
        "app": app,
        "ttl_seconds": body.ttl_seconds,
        "reference": body.reference,
        "description": body.description,
        "auth": permit.as_sql(),
    }
    natural = f"hold:{app}:{body.user_id}:{body.reference}" if body.reference else None
    return op, natural


@router.get(
    "/holds/{hold_id}",
    summary="One hold",
    response_model=HoldOut,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "id": "abaf570e-0a90-423d-a770-f8dccf40a887",
                        "user_id": "101902121794505144784",
                        "app": "penora",
                        "owner": "app:penora",
                        "amount": 12.5,
                        "captured": 9.25,
                        "clawed": 0,
                        "status": "captured",
                        "reference": "story-77",
                        "description": "Story, 5 chapters",
                        "expires_at": "2026-11-26T10:39:02Z",
                        "created_at": "2026-11-26T10:34:02Z",
                        "resolved_at": "2026-11-26T10:36:10Z",
                    }
                }
            }
        },
    },
)
async def get_hold(
    hold_id: str, principal: CurrentPrincipal, request: Request, session: Session
) -> dict[str, Any]:
    """A hold and its state (users: their own user's holds; apps and services: their own)."""
    permit = _permit("ledger.hold.read", principal, request)
    repo = LedgerRepository(session)
    hold = await repo.hold(_uuid(hold_id))
    if hold is None:
        raise NotFound("No such hold", code="hold_not_found")
    if permit.holds != "*" and hold.get("owner") != permit.holds:
        raise Forbidden("This hold belongs to someone else", code="not_your_hold")
    await repo.check_user(permit, hold["user_id"])
    return rename_milli(hold)


def _uuid(value: str) -> str:
    import uuid

    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise NotFound("No such hold", code="hold_not_found") from None


async def _resolve(
    kind: str,
    hold_id: str,
    amount: int | None,
    reason: str | None,
    request: Request,
    principal: Principal,
) -> Response:
    permit = _permit(f"ledger.{kind}", principal, request, reason=reason)
    op = _resolve_op(kind, hold_id, amount, permit)
    # A hold resolves once: the hold id is its own natural key, so no key is required.
    outcome = await _ledger(request).execute(
        op, principal, key=idempotency_key(request, None), require_key=False
    )
    return _respond(outcome, HoldResult)


def _resolve_op(kind: str, hold_id: str, amount: int | None, permit: Permit) -> dict[str, Any]:
    return {"op": kind, "hold_id": _uuid(hold_id), "amount": amount, "auth": permit.as_sql()}


@router.post(
    "/holds/{hold_id}/capture",
    summary="Capture a hold (all or part of it)",
    response_model=HoldResult,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "hold": {
                            "id": "d5ae7698-cbca-4af8-8c31-f1e268ae78f7",
                            "user_id": "101902121794505144784",
                            "app": "penora",
                            "owner": "app:penora",
                            "amount": 12.5,
                            "captured": 9.25,
                            "clawed": 0,
                            "status": "captured",
                            "reference": "story-77",
                            "description": "Story, 5 chapters",
                            "expires_at": "2026-11-26T10:32:31Z",
                            "created_at": "2026-11-26T10:27:31Z",
                            "resolved_at": "2026-11-26T10:27:31Z",
                        },
                        "transaction_id": 4,
                        "available": 36.5,
                        "held": 0,
                    }
                }
            }
        },
    },
)
@hot(CaptureIn, optional=True)
async def capture_hold(
    hold_id: str,
    request: Request,
    principal: CurrentPrincipal,
    body: CaptureIn | None = None,
) -> Response:
    """Spend all or part of a hold; the rest goes back to the user. Resolves it."""
    amount = body.amount if body else None
    reason = body.reason if body else None
    return await _resolve("capture", hold_id, amount, reason, request, principal)


@router.post(
    "/holds/{hold_id}/release",
    summary="Release a hold",
    response_model=HoldResult,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "hold": {
                            "id": "91ae3701-8c6a-4265-b034-480c451de5dd",
                            "user_id": "101902121794505144784",
                            "app": "penora",
                            "owner": "app:penora",
                            "amount": 3,
                            "captured": 0,
                            "clawed": 0,
                            "status": "released",
                            "reference": "story-78",
                            "description": "Story, 3 chapters",
                            "expires_at": "2026-11-26T10:42:31Z",
                            "created_at": "2026-11-26T10:27:31Z",
                            "resolved_at": "2026-11-26T10:27:31Z",
                        },
                        "transaction_id": 6,
                        "available": 36.5,
                        "held": 0,
                    }
                }
            }
        },
    },
)
@hot(ReleaseIn, optional=True)
async def release_hold(
    hold_id: str,
    request: Request,
    principal: CurrentPrincipal,
    body: ReleaseIn | None = None,
) -> Response:
    """Give a hold back in full. Resolves it."""
    reason = body.reason if body else None
    return await _resolve("release", hold_id, None, reason, request, principal)


@router.post(
    "/refunds",
    summary="Refund a debit or a capture",
    status_code=201,
    response_model=Refund,
    responses={
        **ERRORS,
        201: {
            "content": {
                "application/json": {
                    "example": {
                        "transaction_id": 7,
                        "refund_of": 2,
                        "user_id": "101902121794505144784",
                        "app": "penora",
                        "amount": 1.25,
                        "refundable": 3,
                        "returned": 1.25,
                        "debt_settled": 0,
                        "expired": 0,
                        "created_at": "2026-11-26T10:27:31Z",
                        "available": 37.75,
                        "held": 0,
                    }
                }
            }
        },
    },
)
async def create_refund(
    body: RefundCreate,
    request: Request,
    principal: CurrentPrincipal,
) -> Response:
    """Refund all or part of an earlier debit or capture of yours, never more than it."""
    permit = _permit("ledger.refund", principal, request, reason=body.reason)
    op, natural = _refund_op(body, permit)
    outcome = await _ledger(request).execute(op, principal, key=idempotency_key(request, natural))
    return _respond(outcome, Refund)


def _refund_op(body: RefundCreate, permit: Permit) -> tuple[dict[str, Any], str | None]:
    op: dict[str, Any] = {
        "op": "refund",
        "transaction_id": body.transaction_id,
        "amount": body.amount,
        "reference": body.reference,
        "description": body.description,
        "auth": permit.as_sql(),
    }
    natural = f"refund:{body.transaction_id}:{body.reference}" if body.reference else None
    return op, natural


# A batch item's operation name in the authority table, its builder and its response.
_ITEM_OPERATION = {
    "debit": "ledger.debit",
    "hold": "ledger.reserve",
    "capture": "ledger.capture",
    "release": "ledger.release",
    "grant": "ledger.grant",
    "refund": "ledger.refund",
}
_ITEM_OUT: dict[str, type[BaseModel]] = {
    "debit": Debit,
    "hold": HoldResult,
    "capture": HoldResult,
    "release": HoldResult,
    "grant": Grant,
    "refund": Refund,
}


def _item_op(
    item: Any, principal: Principal, origin: Principal | None
) -> tuple[dict[str, Any], str | None]:
    """One batch item through the same table check and builder as its single route."""
    operation = _ITEM_OPERATION[item.op]
    app = item.app if item.op in ("debit", "hold") else None
    permit = authorize(principal, operation, origin=origin, app=app, reason=item.reason)
    if item.op == "debit":
        return _debit_op(item, permit)
    if item.op == "hold":
        return _hold_op(item, permit)
    if item.op == "grant":
        return _grant_op(item, permit)
    if item.op == "refund":
        return _refund_op(item, permit)
    amount = item.amount if item.op == "capture" else None
    return _resolve_op(item.op, item.hold_id, amount, permit), None


def _item_error(index: int, op: str, exc: KuError) -> dict[str, Any]:
    return {
        "index": index,
        "op": op,
        "status": exc.status_code,
        "replayed": False,
        "error": exc.body()["error"],
    }


def _item_result(index: int, op: str, result: dict[str, Any]) -> dict[str, Any]:
    status = int(result["status"])
    replayed = bool(result.get("replayed"))
    if status >= 400:
        out = _item_error(index, op, result_error(result))
        out.update(status=status, replayed=replayed)
        return out
    body = _ITEM_OUT[op].model_validate(rename_milli(result["body"])).model_dump(mode="json")
    return {"index": index, "op": op, "status": status, "replayed": replayed, "body": body}


@router.post(
    "/batch",
    summary="Apply many ledger operations in one request",
    response_model=BatchOut,
    responses={
        **ERRORS,
        **error_responses(
            {
                409: (
                    "The batch's Idempotency-Key was used with other operations",
                    Conflict(
                        "This Idempotency-Key was used with a different batch",
                        code="idempotency_key_reused",
                    ),
                ),
                422: (
                    "A malformed item, a repeated item key, or more than 1,000 items",
                    [
                        Unprocessable(
                            "Each item of a batch needs its own idempotency_key",
                            code="duplicate_item_key",
                        ),
                        STANDARD[422],
                    ],
                ),
            }
        ),
    },
)
async def apply_batch(
    body: BatchIn, request: Request, principal: CurrentPrincipal, ledger: LedgerDep
) -> Response:
    """Apply up to 1,000 operations (debit, hold, capture, release, grant, refund) for any
    mix of users in one request.

    Each item is what its single route takes (`POST /debits`, `/holds`,
    `/holds/{id}/capture`, `/holds/{id}/release`, `/grants`, `/refunds`) plus `op`
    and its own required `idempotency_key` (the single route's Idempotency-Key: the
    same key in a single request and in a batch item is one request). Each item is
    checked by the same authority table and the same ledger rules, and answered on
    its own: `results` in request order, each with `status` and the single route's
    `body` or `error`. One item's 402, 403, 404 or 409 does not fail the others; the
    request itself is 200.

    Limits: 1 to 1,000 items; item keys unique within the batch (else 422 before
    anything is applied); a malformed item (schema) rejects the whole batch, 422.
    The items run in the ledger's group commit, `KU_BATCH_MAX_OPS` per statement,
    sorted by user: no order among items is guaranteed (a capture of a hold placed in
    the same batch may run before the hold: send it in a later batch).

    The batch is idempotent too: with an `Idempotency-Key` header a retry replays the
    first answer (`Idempotent-Replayed: true`; an answer with a 5xx or a 403 item is
    not stored, so a retry tries that item again), and the same key with other operations is 409
    `idempotency_key_reused`. Without one, a retry is still safe: every item
    replays under its own key."""
    items = body.operations
    if len({item.idempotency_key for item in items}) != len(items):
        raise Unprocessable(
            "Each item of a batch needs its own idempotency_key", code="duplicate_item_key"
        )
    batch_key = key_from_request(request, None)
    batch_hash = ""
    if batch_key is not None:
        batch_hash = request_hash(body.model_dump(mode="json"))
        stored = await ledger.claim_batch(principal, batch_key, batch_hash)
        if stored is not None:
            return Response(
                stored, media_type="application/json", headers={"Idempotent-Replayed": "true"}
            )

    origin = origin_principal(request, principal)
    results: list[dict[str, Any] | None] = [None] * len(items)
    prepared: list[dict[str, Any]] = []
    where: list[int] = []
    for index, item in enumerate(items):
        try:
            op, natural = _item_op(item, principal, origin)
            keys = Keys(header=item.idempotency_key, natural=natural)
            prepared.append(ledger.prepare(op, principal, key=keys))
        except KuError as exc:
            results[index] = _item_error(index, item.op, exc)
            continue
        where.append(index)
    for index, result in zip(where, await ledger.execute_many(prepared), strict=True):
        results[index] = _item_result(index, items[index].op, result)

    failed = sum(1 for r in results if r is not None and r["status"] >= 400)
    raw = orjson.dumps({"results": results, "succeeded": len(items) - failed, "failed": failed})
    # An item the database could not take (5xx: unreachable, refused) was not applied
    # and is not remembered under its key, nor is a denied one (403: about the caller,
    # not the request, e.g. a link not yet known): an answer holding one is not stored
    # either, so a retry of the batch tries it again instead of replaying the failure.
    if batch_key is not None and all(
        r is not None and r["status"] < 500 and r["status"] != 403 for r in results
    ):
        await ledger.store_batch(principal, batch_key, batch_hash, raw)
    return Response(raw, media_type="application/json")


def _cursor(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(base64.urlsafe_b64decode(value.encode()).decode())
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("Invalid cursor", code="invalid_cursor") from None


@router.get(
    "/transactions",
    summary="A user's transactions, newest first",
    response_model=TransactionPage,
    responses=ERRORS,
)
async def list_transactions(
    user_id: UserId,
    principal: CurrentPrincipal,
    request: Request,
    session: Session,
    app: AppName | None = None,
    kind: TransactionKind | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> TransactionPage:
    """The user's journal, newest first, with filters and cursor pagination."""
    await _may_read(principal, request, session, user_id)
    rows = await LedgerRepository(session).transactions(
        user_id,
        app=app,
        kind=kind,
        since=since,
        until=until,
        before_id=_cursor(cursor),
        limit=limit + 1,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = (
        base64.urlsafe_b64encode(str(rows[-1]["id"]).encode()).decode() if more and rows else None
    )
    return TransactionPage(
        items=[TransactionOut.model_validate(rename_milli(r)) for r in rows],
        next_cursor=next_cursor,
    )


@router.get(
    "/usage",
    summary="Credits spent per app and day",
    response_model=Usage,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "user_id": "101902121794505144784",
                        "group_by": ["app"],
                        "rows": [{"app": "penora", "day": None, "spent": 9.25, "charges": 1}],
                        "total_spent": 9.25,
                    }
                }
            }
        },
    },
)
async def get_usage(
    user_id: UserId,
    principal: CurrentPrincipal,
    request: Request,
    session: Session,
    group_by: str = Query("app", description="Comma-separated: app, day"),
    since: datetime | None = None,
    until: datetime | None = None,
) -> Usage:
    """Net spend (charges minus refunds) grouped by app and/or day."""
    await _may_read(principal, request, session, user_id)
    groups = [g.strip() for g in group_by.split(",") if g.strip()]
    if any(g not in ("app", "day") for g in groups) or len(set(groups)) != len(groups):
        raise BadRequest("group_by takes app and/or day", code="invalid_group_by")
    rows = await LedgerRepository(session).usage(user_id, groups, since, until)
    return Usage(
        user_id=user_id,
        group_by=groups,
        rows=[UsageRow.model_validate(rename_milli(r)) for r in rows],
        total_spent=sum(int(r["spent_milli"]) for r in rows),
    )
