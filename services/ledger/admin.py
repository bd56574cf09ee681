"""What operators see and do beyond the partner API (admin scope only): the day's
totals and a 30-day series, one user's lots, holds and debt, and clawbacks.

A module of its own (routes, their few read-only queries, and the clawback's call
into the same `ledger.apply` every movement goes through) so that it stays apart
from the partner-facing endpoints and repository. Amounts come from the postings,
like `/usage`: issuance by source, spend by app; they are never a hot counter.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy import text

from services.kit.authority import authorize
from services.kit.db import Session
from services.kit.errors import BadRequest, Conflict, Forbidden, NotFound
from services.kit.money import Ku, PositiveKu
from services.kit.openapi import STANDARD, error_responses
from services.kit.principal import CurrentPrincipal
from services.kit.schemas import Reference, TextGuard, UserId, rename_milli
from services.ledger.schemas import GrantSource
from services.ledger.service import Ledger, idempotency_key

router = APIRouter(prefix="/v1/ledger/admin", tags=["ledger admin"])

ERRORS = error_responses(
    {
        400: (
            "Missing Idempotency-Key",
            BadRequest(
                "Send an Idempotency-Key header or a reference so a retry cannot charge twice",
                code="idempotency_key_required",
            ),
        ),
        401: "Missing or invalid credentials",
        403: ("Needs the admin scope", Forbidden("Missing scope: admin", code="missing_scope")),
        404: (
            "No ledger account for this user, or no grant with this reference",
            [
                STANDARD[404],
                NotFound("No grant with this reference to claw back", code="grant_not_found"),
            ],
        ),
        409: (
            "Idempotency-Key reused with another request",
            Conflict(
                "This idempotency key or reference was used with a different request",
                code="idempotency_key_reused",
            ),
        ),
        422: "Invalid input (amount, empty reason, ...)",
    }
)


class AppAmount(BaseModel):
    name: str = Field(description="An app (spend, holds) or a grant source (issuance)")
    amount: Ku


class DayTotals(BaseModel):
    day: date
    issued: Ku
    spent: Ku


class Overview(BaseModel):
    accounts: int = Field(description="Users with a ledger account")
    since: datetime = Field(description="Start of today (UTC)")
    issued_today: list[AppAmount] = Field(description="Net credit issued today, per source")
    spent_today: list[AppAmount] = Field(description="Net spend today, per app")
    held_now: list[AppAmount] = Field(description="Active holds, per app")
    days: list[DayTotals] = Field(description="Issued and spent per day, oldest first")


class Lot(BaseModel):
    id: int
    source: str
    amount: Ku
    remaining: Ku
    expires_at: datetime | None
    expired: bool
    reference: str | None
    created_at: datetime


class HoldRow(BaseModel):
    id: str
    app: str
    amount: Ku
    captured: Ku
    status: str
    reference: str | None
    expires_at: datetime
    created_at: datetime


class UserLedger(BaseModel):
    user_id: str
    balance: Ku = Field(description="Sum of the lots' remaining (spendable or not yet swept)")
    held: Ku
    debt: Ku = Field(description="Clawed-back credit already spent; settled by the next grant")
    lots: list[Lot]
    holds: list[HoldRow] = Field(description="The 50 most recent holds")


class ClawbackCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "user_id": "101902121794505144784",
                    "amount": 10,
                    "source": "promo",
                    "grant_reference": "promo-2026-11",
                    "reason": "promo granted twice (ticket 4411)",
                }
            ]
        },
    )
    user_id: UserId
    amount: PositiveKu
    source: GrantSource = Field(description="The issuance the credit is taken back from")
    grant_reference: Reference = Field(
        description="The reference of the lot (grant) taken back: at most what it granted"
    )
    reason: Annotated[str, StringConstraints(min_length=3, max_length=500), TextGuard] = Field(
        description="Why; kept on the journal"
    )


class Clawback(BaseModel):
    transaction_id: int
    user_id: str
    source: str
    amount: Ku
    taken: Ku = Field(description="Taken from spendable credit")
    debt_added: Ku = Field(description="The part already spent, now owed")
    debt: Ku
    available: Ku
    held: Ku
    created_at: datetime


@router.get(
    "/overview",
    summary="Issued, spent and held, today and by day (admin)",
    response_model=Overview,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "accounts": 2,
                        "since": "2026-11-26T00:00:00Z",
                        "issued_today": [{"name": "welcome", "amount": 100}],
                        "spent_today": [{"name": "penora", "amount": 9.25}],
                        "held_now": [],
                        "days": [
                            {"day": "2026-11-25", "issued": 0, "spent": 0},
                            {"day": "2026-11-26", "issued": 100, "spent": 9.25},
                        ],
                    }
                }
            }
        },
    },
)
async def overview(
    principal: CurrentPrincipal,
    session: Session,
    days: Annotated[int, Query(ge=1, le=366)] = 30,
) -> dict[str, Any]:
    """Today's credit issued, spent and held, per app, and a daily series (admin)."""
    principal.require_scope("admin")
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    first = today - timedelta(days=days - 1)
    accounts = (await session.execute(text("SELECT count(*) FROM ledger.wallets"))).scalar_one()
    per_account = text(
        "SELECT p.owner AS name, SUM(p.amount_milli)::bigint AS amount_milli"
        " FROM ledger.transactions t JOIN ledger.postings p ON p.tx_id = t.id"
        " WHERE p.account = :account AND t.created_at >= :since"
        " GROUP BY p.owner ORDER BY p.owner"
    )
    issued = await session.execute(per_account, {"account": "issuance", "since": today})
    spent = await session.execute(per_account, {"account": "spend", "since": today})
    held = await session.execute(
        text(
            "SELECT app AS name, SUM(amount_milli)::bigint AS amount_milli FROM ledger.holds"
            " WHERE status = 'active' AND expires_at > now() GROUP BY app ORDER BY app"
        )
    )
    series = await session.execute(
        text(
            "SELECT (t.created_at AT TIME ZONE 'UTC')::date AS day,"
            " COALESCE(-SUM(p.amount_milli) FILTER (WHERE p.account = 'issuance'), 0)::bigint"
            "   AS issued_milli,"
            " COALESCE(SUM(p.amount_milli) FILTER (WHERE p.account = 'spend'), 0)::bigint"
            "   AS spent_milli"
            " FROM ledger.transactions t JOIN ledger.postings p ON p.tx_id = t.id"
            " WHERE t.created_at >= :since AND p.account IN ('issuance', 'spend')"
            " GROUP BY 1"
        ),
        {"since": first},
    )
    found = {r.day: r for r in series}
    return {
        "accounts": accounts,
        "since": today,
        # Issuance postings are the negative side of a grant: flip them to read as issued.
        "issued_today": [{"name": r.name, "amount": -r.amount_milli} for r in issued],
        "spent_today": [{"name": r.name, "amount": r.amount_milli} for r in spent],
        "held_now": [{"name": r.name, "amount": r.amount_milli} for r in held],
        "days": [
            {
                "day": day,
                "issued": found[day].issued_milli if day in found else 0,
                "spent": found[day].spent_milli if day in found else 0,
            }
            for day in (first.date() + timedelta(days=i) for i in range(days))
        ],
    }


@router.get(
    "/users/{user_id}",
    summary="A user's lots, holds and debt (admin)",
    response_model=UserLedger,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "user_id": "101902121794505144784",
                        "balance": 65.75,
                        "held": 0,
                        "debt": 0,
                        "lots": [
                            {
                                "id": 1,
                                "source": "welcome",
                                "amount": 50,
                                "remaining": 40.75,
                                "expires_at": "2027-11-26T07:34:00Z",
                                "expired": False,
                                "reference": "welcome",
                                "created_at": "2026-11-26T10:34:00Z",
                            },
                            {
                                "id": 2,
                                "source": "promo",
                                "amount": 25,
                                "remaining": 25,
                                "expires_at": "2027-01-31T00:00:00Z",
                                "expired": False,
                                "reference": "promo-launch-week",
                                "created_at": "2026-11-26T10:35:00Z",
                            },
                        ],
                        "holds": [
                            {
                                "id": "abaf570e-0a90-423d-a770-f8dccf40a887",
                                "app": "penora",
                                "amount": 12.5,
                                "captured": 9.25,
                                "status": "captured",
                                "reference": "story-77",
                                "expires_at": "2026-11-26T10:39:02Z",
                                "created_at": "2026-11-26T10:34:02Z",
                            }
                        ],
                    }
                }
            }
        },
    },
)
async def user_ledger(user_id: UserId, principal: CurrentPrincipal, session: Session) -> Any:
    """One user's wallet, every lot with its expiry, recent holds and debt (admin)."""
    principal.require_scope("admin")
    wallet = (
        await session.execute(
            text(
                "SELECT balance_milli, held_milli, debt_milli FROM ledger.wallets"
                " WHERE user_id = :u"
            ),
            {"u": user_id},
        )
    ).first()
    if wallet is None:
        raise NotFound("No ledger account for this user", code="unknown_user", user_id=user_id)
    lots = await session.execute(
        text(
            "SELECT id, source, amount_milli, remaining_milli, expires_at, reference, created_at,"
            " (expires_at IS NOT NULL AND expires_at <= now()) AS expired"
            " FROM ledger.grants WHERE user_id = :u ORDER BY created_at DESC, id DESC"
        ),
        {"u": user_id},
    )
    holds = await session.execute(
        text(
            "SELECT id::text AS id, app, amount_milli, captured_milli, status, reference,"
            " expires_at, created_at FROM ledger.holds WHERE user_id = :u"
            " ORDER BY created_at DESC LIMIT 50"
        ),
        {"u": user_id},
    )
    return UserLedger(
        user_id=user_id,
        balance=wallet.balance_milli,
        held=wallet.held_milli,
        debt=wallet.debt_milli,
        lots=[Lot.model_validate(rename_milli(dict(r._mapping))) for r in lots],
        holds=[HoldRow.model_validate(rename_milli(dict(r._mapping))) for r in holds],
    )


async def get_ledger(request: Request) -> Ledger:
    return request.app.state.ledger


@router.post(
    "/clawbacks",
    summary="Claw back a lot's credits (admin)",
    status_code=201,
    response_model=Clawback,
    responses={
        **ERRORS,
        201: {
            "content": {
                "application/json": {
                    "example": {
                        "transaction_id": 4,
                        "user_id": "101902121794505144784",
                        "source": "purchase",
                        "amount": 10,
                        "taken": 10,
                        "debt_added": 0,
                        "debt": 0,
                        "available": 75,
                        "held": 0,
                        "created_at": "2026-11-26T10:45:13Z",
                    }
                }
            }
        },
    },
)
async def create_clawback(
    body: ClawbackCreate,
    request: Request,
    response: Response,
    principal: CurrentPrincipal,
    ledger: Annotated[Ledger, Depends(get_ledger)],
) -> dict[str, Any]:
    """Take credit back from a user, with a reason; what was already spent becomes debt."""
    permit = authorize(principal, "ledger.clawback", reason=body.reason)
    op = {
        "op": "clawback",
        "user_id": body.user_id,
        "amount": body.amount,
        "source": body.source,
        "grant_reference": body.grant_reference,
        "description": body.reason,
        "app": principal.app,
        "auth": permit.as_sql(),
    }
    outcome = await ledger.execute(op, principal, key=idempotency_key(request, None))
    response.status_code = outcome.status_code
    if outcome.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return rename_milli(outcome.body)
