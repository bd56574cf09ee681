from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response

from services.kit.authority import Permit, authorize
from services.kit.db import Session
from services.kit.errors import BadRequest, Forbidden, NotFound, Unprocessable
from services.kit.principal import Principal, get_principal, origin_principal
from services.kit.schemas import AppName, UserId, rename_milli
from services.ledger.config import get_settings
from services.ledger.repository import LedgerRepository
from services.ledger.schemas import (
    Account,
    AccountCreate,
    Balance,
    CaptureIn,
    Debit,
    DebitCreate,
    Grant,
    GrantCreate,
    HoldCreate,
    HoldOut,
    HoldResult,
    NextExpiry,
    Refund,
    RefundCreate,
    ReleaseIn,
    SourceBalance,
    TransactionKind,
    TransactionOut,
    TransactionPage,
    Usage,
    UsageRow,
)
from services.ledger.service import Ledger, Outcome, idempotency_key

router = APIRouter(prefix="/v1/ledger", tags=["ledger"])

CurrentPrincipal = Annotated[Principal, Depends(get_principal)]

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Malformed request or missing Idempotency-Key"},
    401: {"description": "Missing or invalid credentials"},
    403: {"description": "Missing scope, or another user's data"},
    404: {"description": "Unknown user, hold or transaction"},
    409: {"description": "Idempotency-Key reused with another request, or hold already resolved"},
    422: {"description": "Invalid input (amount, capture above hold, ...)"},
}


async def get_ledger(request: Request) -> Ledger:
    return request.app.state.ledger


LedgerDep = Annotated[Ledger, Depends(get_ledger)]


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
    linked = None
    if permit.users.startswith("linked:"):
        linked = await LedgerRepository(session).is_linked(user_id, permit.users[7:])
    permit.check_user(user_id, linked)
    return permit


def _respond(response: Response, outcome: Outcome) -> dict[str, Any]:
    response.status_code = outcome.status_code
    if outcome.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return rename_milli(outcome.body)


@router.get("/balance", response_model=Balance, responses=ERRORS)
async def get_balance(
    user_id: UserId, principal: CurrentPrincipal, request: Request, session: Session
) -> Balance:
    """A user's spendable, held and total credit, per source, with the next expiry."""
    await _may_read(principal, request, session, user_id)
    found = await LedgerRepository(session).balance(user_id)
    if found is None:
        raise NotFound("No ledger account for this user", code="unknown_user", user_id=user_id)
    sources = found["sources"]
    available = sum(int(s["amount_milli"]) for s in sources)
    expiry = found["next_expiry"]
    return Balance(
        user_id=user_id,
        available=available,
        held=found["held_milli"],
        debt=found["debt_milli"],
        total=available + found["held_milli"],
        by_source=[SourceBalance(source=s["source"], available=s["amount_milli"]) for s in sources],
        next_expiry=NextExpiry(at=expiry["at"], amount=expiry["amount_milli"]) if expiry else None,
    )


@router.post("/accounts", response_model=Account, responses=ERRORS)
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
        if not body.reason:
            raise Unprocessable("Initial credits need a reason", code="reason_required")
        audit = {"actor": principal.who, "reason": body.reason}
        amount = body.initial_credits
    else:
        amount = get_settings().welcome_credits_milli if body.welcome else 0
    outcome = await ledger.open_account(body.user_id, amount, audit=audit)
    body_out = rename_milli(outcome.body)
    response.status_code = 201 if body_out.get("created") else 200
    return body_out


@router.post("/grants", status_code=201, response_model=Grant, responses=ERRORS)
async def create_grant(
    body: GrantCreate,
    request: Request,
    response: Response,
    principal: CurrentPrincipal,
    ledger: LedgerDep,
) -> dict[str, Any]:
    """Add credit to a user as a grant (a lot with a source, optional expiry and priority)."""
    permit = _permit("ledger.grant", principal, request, reason=body.reason)
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
    outcome = await ledger.execute(op, principal, key=idempotency_key(request, natural))
    return _respond(response, outcome)


@router.post(
    "/debits",
    status_code=201,
    response_model=Debit,
    responses={
        **ERRORS,
        402: {"description": "Insufficient credits; `detail.available` says how much there is"},
    },
)
async def create_debit(
    body: DebitCreate,
    request: Request,
    response: Response,
    principal: CurrentPrincipal,
    ledger: LedgerDep,
) -> dict[str, Any]:
    """Spend credit at once (one-shot). Retries with the same key or reference replay."""
    permit = _permit("ledger.debit", principal, request, app=body.app, reason=body.reason)
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
    outcome = await ledger.execute(
        op,
        principal,
        key=idempotency_key(request, natural),
    )
    return _respond(response, outcome)


@router.post(
    "/holds",
    status_code=201,
    response_model=HoldResult,
    responses={**ERRORS, 402: {"description": "Insufficient credits"}},
)
async def create_hold(
    body: HoldCreate,
    request: Request,
    response: Response,
    principal: CurrentPrincipal,
    ledger: LedgerDep,
) -> dict[str, Any]:
    """Reserve credit for work about to run; capture or release it later, or it expires."""
    permit = _permit("ledger.reserve", principal, request, app=body.app, reason=body.reason)
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
    outcome = await ledger.execute(
        op,
        principal,
        key=idempotency_key(request, natural),
    )
    return _respond(response, outcome)


@router.get("/holds/{hold_id}", response_model=HoldOut, responses=ERRORS)
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
    linked = None
    if permit.users.startswith("linked:"):
        linked = await repo.is_linked(hold["user_id"], permit.users[7:])
    permit.check_user(hold["user_id"], linked)
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
    response: Response,
    principal: Principal,
    ledger: Ledger,
) -> dict[str, Any]:
    permit = _permit(f"ledger.{kind}", principal, request, reason=reason)
    op: dict[str, Any] = {
        "op": kind,
        "hold_id": _uuid(hold_id),
        "amount": amount,
        "auth": permit.as_sql(),
    }
    # A hold resolves once: the hold id is its own natural key, so no key is required.
    outcome = await ledger.execute(
        op,
        principal,
        key=idempotency_key(request, None),
        require_key=False,
    )
    return _respond(response, outcome)


@router.post("/holds/{hold_id}/capture", response_model=HoldResult, responses=ERRORS)
async def capture_hold(
    hold_id: str,
    request: Request,
    response: Response,
    principal: CurrentPrincipal,
    ledger: LedgerDep,
    body: CaptureIn | None = None,
) -> dict[str, Any]:
    """Spend all or part of a hold; the rest goes back to the user. Resolves it."""
    amount = body.amount if body else None
    reason = body.reason if body else None
    return await _resolve("capture", hold_id, amount, reason, request, response, principal, ledger)


@router.post("/holds/{hold_id}/release", response_model=HoldResult, responses=ERRORS)
async def release_hold(
    hold_id: str,
    request: Request,
    response: Response,
    principal: CurrentPrincipal,
    ledger: LedgerDep,
    body: ReleaseIn | None = None,
) -> dict[str, Any]:
    """Give a hold back in full. Resolves it."""
    reason = body.reason if body else None
    return await _resolve("release", hold_id, None, reason, request, response, principal, ledger)


@router.post("/refunds", status_code=201, response_model=Refund, responses=ERRORS)
async def create_refund(
    body: RefundCreate,
    request: Request,
    response: Response,
    principal: CurrentPrincipal,
    ledger: LedgerDep,
) -> dict[str, Any]:
    """Refund all or part of an earlier debit or capture of yours, never more than it."""
    permit = _permit("ledger.refund", principal, request, reason=body.reason)
    op: dict[str, Any] = {
        "op": "refund",
        "transaction_id": body.transaction_id,
        "amount": body.amount,
        "reference": body.reference,
        "description": body.description,
        "auth": permit.as_sql(),
    }
    natural = f"refund:{body.transaction_id}:{body.reference}" if body.reference else None
    outcome = await ledger.execute(op, principal, key=idempotency_key(request, natural))
    return _respond(response, outcome)


def _cursor(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(base64.urlsafe_b64decode(value.encode()).decode())
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("Invalid cursor", code="invalid_cursor") from None


@router.get("/transactions", response_model=TransactionPage, responses=ERRORS)
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


@router.get("/usage", response_model=Usage, responses=ERRORS)
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
