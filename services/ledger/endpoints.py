from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response

from services.kit.db import Session
from services.kit.errors import BadRequest, NotFound
from services.kit.principal import Principal, get_principal
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


# INTERIM: the lead's authority module (services/ledger/authority.py) replaces this
# function. It builds the `auth` that SQL enforces (docs/ledger.md "Authority") so
# that it reproduces the rules the endpoints had before: a user token acts only for
# its own user; an app or admin for any user; holds are recorded as owned by
# "app:<app>" and any hold may be resolved (as before); an app without `ledger:grant`
# refunds only its own charges, anyone else any charge.
def interim_authority(principal: Principal, *, app: str | None = None) -> dict[str, Any]:
    user = f"self:{principal.user_id}" if principal.kind == "user" else "any"
    refund_own = not principal.has_scope("ledger:grant") and principal.app
    return {
        "user": user,
        "owner": f"app:{app or principal.app or 'unknown'}",
        "holds": "*",
        "charges": principal.app if refund_own else "*",
    }


def _respond(response: Response, outcome: Outcome) -> dict[str, Any]:
    response.status_code = outcome.status_code
    if outcome.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return rename_milli(outcome.body)


@router.get("/balance", response_model=Balance, responses=ERRORS)
async def get_balance(user_id: UserId, principal: CurrentPrincipal, session: Session) -> Balance:
    """A user's spendable, held and total credit, per source, with the next expiry."""
    principal.require_scope("ledger:read", "ledger:write")
    principal.acts_for(user_id)
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
    body: AccountCreate, principal: CurrentPrincipal, ledger: LedgerDep, response: Response
) -> dict[str, Any]:
    """Open a user's account; with `welcome`, grant the welcome credits once per user."""
    principal.require_scope("users:write", "ledger:grant")
    welcome = get_settings().welcome_credits_milli if body.welcome else 0
    outcome = await ledger.open_account(body.user_id, welcome)
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
    principal.require_scope("ledger:grant")
    op = {
        "op": "grant",
        "user_id": body.user_id,
        "amount": body.amount,
        "source": body.source,
        "expires_at": body.expires_at.isoformat() if body.expires_at else None,
        "priority": body.priority,
        "reference": body.reference,
        "description": body.description,
        "app": principal.app,
    }
    natural = f"grant:{body.user_id}:{body.source}:{body.reference}" if body.reference else None
    outcome = await ledger.execute(
        op, principal, key=idempotency_key(request, natural), auth=interim_authority(principal)
    )
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
    principal.require_scope("ledger:write")
    principal.acts_for(body.user_id)
    app = body.app or principal.app or "unknown"
    op = {
        "op": "debit",
        "user_id": body.user_id,
        "amount": body.amount,
        "app": app,
        "description": body.description,
        "reference": body.reference,
    }
    natural = f"debit:{app}:{body.user_id}:{body.reference}" if body.reference else None
    outcome = await ledger.execute(
        op,
        principal,
        key=idempotency_key(request, natural),
        auth=interim_authority(principal, app=app),
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
    principal.require_scope("ledger:write")
    principal.acts_for(body.user_id)
    app = body.app or principal.app or "unknown"
    op = {
        "op": "reserve",
        "user_id": body.user_id,
        "amount": body.amount,
        "app": app,
        "ttl_seconds": body.ttl_seconds,
        "reference": body.reference,
        "description": body.description,
    }
    natural = f"hold:{app}:{body.user_id}:{body.reference}" if body.reference else None
    outcome = await ledger.execute(
        op,
        principal,
        key=idempotency_key(request, natural),
        auth=interim_authority(principal, app=app),
    )
    return _respond(response, outcome)


@router.get("/holds/{hold_id}", response_model=HoldOut, responses=ERRORS)
async def get_hold(hold_id: str, principal: CurrentPrincipal, session: Session) -> dict[str, Any]:
    """A hold and its state."""
    principal.require_scope("ledger:read", "ledger:write")
    hold = await LedgerRepository(session).hold(_uuid(hold_id))
    if hold is None:
        raise NotFound("No such hold", code="hold_not_found")
    principal.acts_for(hold["user_id"])
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
    request: Request,
    response: Response,
    principal: Principal,
    ledger: Ledger,
) -> dict[str, Any]:
    principal.require_scope("ledger:write")
    op: dict[str, Any] = {"op": kind, "hold_id": _uuid(hold_id), "amount": amount}
    # A hold resolves once: the hold id is its own natural key, so no key is required.
    outcome = await ledger.execute(
        op,
        principal,
        key=idempotency_key(request, None),
        require_key=False,
        auth=interim_authority(principal),
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
    return await _resolve("capture", hold_id, amount, request, response, principal, ledger)


@router.post("/holds/{hold_id}/release", response_model=HoldResult, responses=ERRORS)
async def release_hold(
    hold_id: str,
    request: Request,
    response: Response,
    principal: CurrentPrincipal,
    ledger: LedgerDep,
) -> dict[str, Any]:
    """Give a hold back in full. Resolves it."""
    return await _resolve("release", hold_id, None, request, response, principal, ledger)


@router.post("/refunds", status_code=201, response_model=Refund, responses=ERRORS)
async def create_refund(
    body: RefundCreate,
    request: Request,
    response: Response,
    principal: CurrentPrincipal,
    ledger: LedgerDep,
) -> dict[str, Any]:
    """Refund all or part of an earlier debit or capture, never more than it."""
    principal.require_scope("ledger:write", "ledger:grant")
    op: dict[str, Any] = {
        "op": "refund",
        "transaction_id": body.transaction_id,
        "amount": body.amount,
        "reference": body.reference,
        "description": body.description,
    }
    natural = f"refund:{body.transaction_id}:{body.reference}" if body.reference else None
    outcome = await ledger.execute(
        op, principal, key=idempotency_key(request, natural), auth=interim_authority(principal)
    )
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
    session: Session,
    app: AppName | None = None,
    kind: TransactionKind | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> TransactionPage:
    """The user's journal, newest first, with filters and cursor pagination."""
    principal.require_scope("ledger:read", "ledger:write")
    principal.acts_for(user_id)
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
    session: Session,
    group_by: str = Query("app", description="Comma-separated: app, day"),
    since: datetime | None = None,
    until: datetime | None = None,
) -> Usage:
    """Net spend (charges minus refunds) grouped by app and/or day."""
    principal.require_scope("ledger:read", "ledger:write")
    principal.acts_for(user_id)
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
