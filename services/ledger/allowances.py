"""Monthly allowances: UNITS a user may use in a month (e.g. included enhancements).

Not Ku: an allowance is no part of any balance, never spendable as credit, never drawn
by a debit or a hold. Its rows (docs/ledger.md "Allowances"):

- `ledger.allowances(user_id, kind, period)`: `granted` (only rises), `used`,
  `expires_at` (the first instant of the next month, UTC);
- `ledger.allowance_draws(reference)`: one unit for one reference, ever; `active` until
  `confirmed` or `returned`, or `expired` past its TTL (the unit comes back);
- `ledger.allowance_entries`: every movement, append-only; per allowance they sum to
  `granted` and `used` (`ku ledger verify`).

Each operation is one transaction of its own on the writer pool, outside the group
committer (one per enhancement: rare next to debits). Locks are always taken in one
order: the allowance row, then the draw row. Decisions compare with
`clock_timestamp()`, the instant of the decision. Idempotency is natural: a grant is
"at least N" (raising to N twice is one increase), a draw is keyed by its reference,
a confirmation or a return resolves a draw once. A refused draw records nothing.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Query, Request, Response

from services.kit.authority import Permit
from services.kit.errors import (
    Conflict,
    Forbidden,
    KuError,
    NotFound,
    PaymentRequired,
    Unprocessable,
)
from services.kit.openapi import STANDARD, error_responses, json_example
from services.kit.principal import CurrentPrincipal
from services.kit.schemas import UserId
from services.ledger.endpoints import ERRORS, _permit, model_response
from services.ledger.schemas import (
    AllowanceDrawIn,
    AllowanceDrawResult,
    AllowanceGrantIn,
    AllowanceGrantOut,
    AllowanceList,
)

log = logging.getLogger("ku.ledger.allowances")

SWEEP_BATCH = 500


def period_of(at: datetime) -> str:
    at = at.astimezone(UTC)
    return f"{at.year:04d}-{at.month:02d}"


def period_end(period: str) -> datetime:
    """The first instant of the month after `period` ('YYYY-MM'), UTC."""
    year, month = int(period[:4]), int(period[5:7])
    start = datetime(year, month, 1, tzinfo=UTC)
    return (start + timedelta(days=32)).replace(day=1)


def _state(row: asyncpg.Record, now: datetime) -> dict[str, Any]:
    expired = row["expires_at"] <= now
    return {
        "user_id": row["user_id"],
        "kind": row["kind"],
        "period": row["period"],
        "granted": row["granted"],
        "used": row["used"],
        "remaining": 0 if expired else max(0, row["granted"] - row["used"]),
        "expires_at": row["expires_at"],
        "expired": expired,
    }


def _draw(row: asyncpg.Record) -> dict[str, Any]:
    return {
        k: row[k]
        for k in (
            "reference",
            "user_id",
            "kind",
            "period",
            "owner",
            "status",
            "expires_at",
            "created_at",
            "resolved_at",
        )
    }


_ALLOWANCE = "SELECT * FROM ledger.allowances WHERE user_id = $1 AND kind = $2 AND period = $3"


async def _entry(
    conn: asyncpg.Connection,
    draw_or_allowance: asyncpg.Record,
    entry: str,
    *,
    granted_delta: int = 0,
    used_delta: int = 0,
    reference: str | None = None,
    actor: str | None = None,
) -> None:
    await conn.execute(
        "INSERT INTO ledger.allowance_entries (user_id, kind, period, entry, granted_delta,"
        " used_delta, reference, actor) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        draw_or_allowance["user_id"],
        draw_or_allowance["kind"],
        draw_or_allowance["period"],
        entry,
        granted_delta,
        used_delta,
        reference,
        actor,
    )


async def _give_back(
    conn: asyncpg.Connection,
    allowance: asyncpg.Record,
    draw: asyncpg.Record,
    status: str,
    now: datetime,
    actor: str | None,
) -> tuple[asyncpg.Record, asyncpg.Record, bool]:
    """Resolve an active draw as `returned` or `expired`: its unit comes back while the
    period lasts; after it, nothing does (the unused allowance is gone). Both rows are
    locked by the caller."""
    back = now < allowance["expires_at"]
    if back:
        allowance = await conn.fetchrow(
            "UPDATE ledger.allowances SET used = used - 1, updated_at = $4"
            " WHERE user_id = $1 AND kind = $2 AND period = $3 RETURNING *",
            allowance["user_id"],
            allowance["kind"],
            allowance["period"],
            now,
        )
    draw = await conn.fetchrow(
        "UPDATE ledger.allowance_draws SET status = $2, resolved_at = $3"
        " WHERE reference = $1 RETURNING *",
        draw["reference"],
        status,
        now,
    )
    await _entry(
        conn,
        draw,
        "return" if status == "returned" else "expiry",
        used_delta=-1 if back else 0,
        reference=draw["reference"],
        actor=actor,
    )
    return allowance, draw, back


async def _locked(
    conn: asyncpg.Connection, reference: str
) -> tuple[asyncpg.Record, asyncpg.Record, bool, datetime] | None:
    """A draw and its allowance, both locked (allowance first, the one lock order),
    whether the draw expired just now, and the instant of the decision (read once the
    locks are held): an active draw past its TTL is expired here first (the next
    operation on it resolves it, as a hold's)."""
    found = await conn.fetchrow(
        "SELECT user_id, kind, period FROM ledger.allowance_draws WHERE reference = $1", reference
    )
    if found is None:
        return None
    allowance = await conn.fetchrow(_ALLOWANCE + " FOR UPDATE", *found.values())
    draw = await conn.fetchrow(
        "SELECT * FROM ledger.allowance_draws WHERE reference = $1 FOR UPDATE", reference
    )
    assert allowance is not None and draw is not None
    now = await _now(conn)
    if draw["status"] == "active" and draw["expires_at"] <= now:
        allowance, draw, _ = await _give_back(conn, allowance, draw, "expired", now, "ledger")
        return allowance, draw, True, now
    return allowance, draw, False, now


async def _now(conn: asyncpg.Connection) -> datetime:
    now: datetime = await conn.fetchval("SELECT clock_timestamp()")
    return now


# -- operations ----------------------------------------------------------------------


async def grant(
    pool: asyncpg.Pool,
    *,
    user_id: str,
    kind: str,
    period: str,
    units: int,
    reference: str | None,
    actor: str,
) -> tuple[int, dict[str, Any]]:
    """The allowance is at least `units` afterwards: (201, ...) when it rose, (200, ...)
    when it already was. A period that has ended is 422 `period_ended`."""
    async with pool.acquire() as conn, conn.transaction():
        end = period_end(period)
        await conn.execute(
            "INSERT INTO ledger.allowances (user_id, kind, period, expires_at)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            user_id,
            kind,
            period,
            end,
        )
        row = await conn.fetchrow(_ALLOWANCE + " FOR UPDATE", user_id, kind, period)
        now = await _now(conn)
        if row["expires_at"] <= now:  # rolled back: nothing is created for it either
            raise Unprocessable(
                "This period has ended: nothing is granted for it",
                code="period_ended",
                period=period,
            )
        increase = units - row["granted"]
        if increase > 0:
            row = await conn.fetchrow(
                "UPDATE ledger.allowances SET granted = $4, updated_at = $5"
                " WHERE user_id = $1 AND kind = $2 AND period = $3 RETURNING *",
                user_id,
                kind,
                period,
                units,
                now,
            )
            await _entry(
                conn, row, "grant", granted_delta=increase, reference=reference, actor=actor
            )
        return (201 if increase > 0 else 200), {
            "allowance": _state(row, now),
            "increased_by": max(0, increase),
        }


def _reused(draw: asyncpg.Record, user_id: str, kind: str, period: str) -> None:
    if (draw["user_id"], draw["kind"], draw["period"]) != (user_id, kind, period):
        raise Conflict(
            "This reference drew from another allowance",
            code="reference_reused",
            reference=draw["reference"],
        )


def _exhausted(code: str, message: str, allowance: asyncpg.Record | None, now: datetime) -> KuError:
    detail: dict[str, Any] = {"granted": 0, "used": 0, "remaining": 0}
    if allowance is not None:
        state = _state(allowance, now)
        detail = {k: state[k] for k in ("granted", "used", "remaining")}
    return PaymentRequired(message, code=code, **detail)


async def draw(
    pool: asyncpg.Pool,
    *,
    user_id: str,
    kind: str,
    period: str,
    reference: str,
    ttl_seconds: int,
    cap: int | None,
    owner: str,
) -> tuple[int, dict[str, Any], bool]:
    """One unit for `reference`: (201, result, False); a repeat of the same draw replays
    it, in whatever state it is now (200, result, True). None left (or `cap` reached):
    402 `allowance_exhausted`; the period ended: 402 `allowance_expired`."""
    async with pool.acquire() as conn:
        async with conn.transaction():
            locked = await _locked(conn, reference)
            if locked is not None:  # a repeat: replay what that draw is now
                allowance, row, _, now = locked
                _reused(row, user_id, kind, period)
                return 200, {"draw": _draw(row), "allowance": _state(allowance, now)}, True
            allowance = await conn.fetchrow(_ALLOWANCE + " FOR UPDATE", user_id, kind, period)
            now = await _now(conn)
            if allowance is None:
                raise _exhausted(
                    "allowance_exhausted", "No allowance is granted for this period", None, now
                )
            row = await conn.fetchrow(
                "INSERT INTO ledger.allowance_draws (reference, user_id, kind, period, owner,"
                " expires_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)"
                " ON CONFLICT (reference) DO NOTHING RETURNING *",
                reference,
                user_id,
                kind,
                period,
                owner,
                now + timedelta(seconds=ttl_seconds),
                now,
            )
            if row is None:  # the same reference, drawn concurrently and committed first
                existing = await conn.fetchrow(
                    "SELECT * FROM ledger.allowance_draws WHERE reference = $1", reference
                )
                _reused(existing, user_id, kind, period)
                return 200, {"draw": _draw(existing), "allowance": _state(allowance, now)}, True
            if allowance["expires_at"] <= now:
                raise _exhausted(
                    "allowance_expired", "This period's allowance has expired", allowance, now
                )
            limit = allowance["granted"] if cap is None else min(cap, allowance["granted"])
            if allowance["used"] >= limit:
                raise _exhausted(
                    "allowance_exhausted", "No allowance is left this period", allowance, now
                )
            allowance = await conn.fetchrow(
                "UPDATE ledger.allowances SET used = used + 1, updated_at = $4"
                " WHERE user_id = $1 AND kind = $2 AND period = $3 RETURNING *",
                user_id,
                kind,
                period,
                now,
            )
            await _entry(conn, row, "draw", used_delta=1, reference=reference, actor=owner)
            return 201, {"draw": _draw(row), "allowance": _state(allowance, now)}, False


def _check_owner(row: asyncpg.Record, holds: str) -> None:
    if holds != "*" and row["owner"] != holds:
        raise Forbidden("This draw belongs to someone else", code="not_your_draw")


async def confirm(
    pool: asyncpg.Pool, *, reference: str, holds: str, actor: str
) -> tuple[dict[str, Any], bool]:
    """Confirm an active draw (its unit is spent for good): (result, replayed). Confirmed
    before: replays. Returned: 409 `draw_already_returned`. Expired (TTL), now or before:
    409 `draw_expired`, and its unit came back."""
    error: KuError | None = None
    async with pool.acquire() as conn:
        async with conn.transaction():
            locked = await _locked(conn, reference)
            if locked is None:
                raise NotFound("No draw with this reference", code="draw_not_found")
            allowance, row, _, now = locked
            _check_owner(row, holds)
            replayed = row["status"] == "confirmed"
            if row["status"] == "active":
                row = await conn.fetchrow(
                    "UPDATE ledger.allowance_draws SET status = 'confirmed', resolved_at = $2"
                    " WHERE reference = $1 RETURNING *",
                    reference,
                    now,
                )
                await _entry(conn, row, "confirm", reference=reference, actor=actor)
            elif row["status"] == "expired":
                # Committed as it is (an expiry found here is kept), then refused.
                error = Conflict(
                    "The draw expired before it was confirmed; its unit came back",
                    code="draw_expired",
                    draw=_jsonable(_draw(row)),
                )
            elif row["status"] == "returned":
                error = Conflict(
                    "The draw was already returned",
                    code="draw_already_returned",
                    draw=_jsonable(_draw(row)),
                )
            result = {"draw": _draw(row), "allowance": _state(allowance, now)}
    if error is not None:
        raise error
    return result, replayed


async def give_back(
    pool: asyncpg.Pool, *, reference: str, holds: str, actor: str
) -> tuple[dict[str, Any], bool]:
    """Return an active draw's unit (while its period lasts; after it nothing comes
    back): (result, replayed). Returned or expired before: replays, nothing more comes
    back. Confirmed: 409 `draw_already_confirmed`. Never drawn: 404 `draw_not_found`."""
    error: KuError | None = None
    async with pool.acquire() as conn:
        async with conn.transaction():
            locked = await _locked(conn, reference)
            if locked is None:
                raise NotFound("No draw with this reference", code="draw_not_found")
            allowance, row, _, now = locked
            _check_owner(row, holds)
            given_back = False
            replayed = row["status"] in ("returned", "expired")
            if row["status"] == "active":
                allowance, row, given_back = await _give_back(
                    conn, allowance, row, "returned", now, actor
                )
            elif row["status"] == "confirmed":
                error = Conflict(
                    "The draw was already confirmed",
                    code="draw_already_confirmed",
                    draw=_jsonable(_draw(row)),
                )
            result = {
                "draw": _draw(row),
                "allowance": _state(allowance, now),
                "given_back": given_back,
            }
    if error is not None:
        raise error
    return result, replayed


async def read(
    pool: asyncpg.Pool, user_id: str, period: str, kind: str | None
) -> list[dict[str, Any]]:
    async with pool.acquire() as conn:
        now = await _now(conn)
        rows = await conn.fetch(
            "SELECT * FROM ledger.allowances WHERE user_id = $1 AND period = $2"
            " AND ($3::text IS NULL OR kind = $3) ORDER BY kind",
            user_id,
            period,
            kind,
        )
    return [_state(r, now) for r in rows]


async def expire_draws(pool: asyncpg.Pool, limit: int = SWEEP_BATCH) -> int:
    """The sweep: every active draw past its TTL is expired and its unit comes back (while
    its period lasts). Each in its own transaction; safe to run concurrently."""
    total = 0
    while True:
        async with pool.acquire() as conn:
            due = await conn.fetch(
                "SELECT reference FROM ledger.allowance_draws WHERE status = 'active'"
                " AND expires_at <= clock_timestamp() ORDER BY expires_at LIMIT $1",
                limit,
            )
            for r in due:
                async with conn.transaction():
                    locked = await _locked(conn, r["reference"])
                    total += int(locked is not None and locked[2])
        if len(due) < limit:
            return total


def _jsonable(value: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in value.items()}


# -- routes --------------------------------------------------------------------------

router = APIRouter(prefix="/v1/ledger/allowances", tags=["ledger"])

USER = "101902121794505144784"
REF = "enhancement:6f1c0d2e-4b7a-4f3e-9a51-2d8c7b1e0f43"
STATE = {
    "user_id": USER,
    "kind": "enhancement",
    "period": "2026-11",
    "granted": 10,
    "used": 3,
    "remaining": 7,
    "expires_at": "2026-12-01T00:00:00Z",
    "expired": False,
}
DRAW = {
    "reference": REF,
    "user_id": USER,
    "kind": "enhancement",
    "period": "2026-11",
    "owner": "service:enhancement",
    "status": "active",
    "expires_at": "2026-11-26T11:27:31Z",
    "created_at": "2026-11-26T10:27:31Z",
    "resolved_at": None,
}
DRAW_JSON = {**DRAW, "expires_at": "2026-11-26T11:27:31+00:00"}


def _errors(declared: dict[int, Any]) -> dict[int | str, dict[str, Any]]:
    return {**ERRORS, **error_responses(declared)}


NOT_FOUND = (
    "No draw with this reference (a return of a never-drawn reference gives nothing)",
    [NotFound("No draw with this reference", code="draw_not_found"), STANDARD[404]],
)
FORBIDDEN = (
    "Only the enhancement service moves allowances; a draw is resolved by its drawer",
    [
        Forbidden("A user principal may not do this", code="forbidden"),
        Forbidden("This draw belongs to someone else", code="not_your_draw"),
    ],
)


def _pool(request: Request) -> asyncpg.Pool:
    pool: asyncpg.Pool = request.app.state.ledger.committer.pool
    return pool


@router.post(
    "/grants",
    summary="Grant a user's monthly allowance (at least N units)",
    status_code=201,
    response_model=AllowanceGrantOut,
    responses={
        **_errors(
            {
                403: FORBIDDEN,
                422: (
                    "Invalid input, or a period that has ended",
                    [
                        Unprocessable(
                            "This period has ended: nothing is granted for it",
                            code="period_ended",
                            period="2026-10",
                        ),
                        STANDARD[422],
                    ],
                ),
            }
        ),
        201: json_example(
            {"allowance": {**STATE, "used": 0, "remaining": 10}, "increased_by": 10},
            "The allowance rose to `units`",
        ),
        200: json_example(
            {"allowance": STATE, "increased_by": 0},
            "The allowance already was at least `units`: nothing changed",
        ),
    },
)
async def grant_allowance(
    body: AllowanceGrantIn, request: Request, principal: CurrentPrincipal
) -> Response:
    """Make the user's allowance of `kind` for `period` at least `units` (units, not Ku:
    it is no part of the balance). Idempotent by value: raising to N twice is one
    increase, a lower N changes nothing; each increase is recorded as an entry. The
    enhancement service grants a tier's included count at a user's first included
    enhancement of a month (which covers an upgrade mid-month) and on the 1st."""
    permit = _permit("ledger.allowance.grant", principal, request)
    permit.check_user(body.user_id)
    status, out = await grant(
        _pool(request),
        user_id=body.user_id,
        kind=body.kind,
        period=body.period,
        units=body.units,
        reference=body.reference,
        actor=permit.actor,
    )
    return model_response(status, out, AllowanceGrantOut, replayed=status == 200)


@router.post(
    "/draws",
    summary="Draw one unit of an allowance for a reference",
    status_code=201,
    response_model=AllowanceDrawResult,
    responses={
        **_errors(
            {
                402: (
                    "No unit left this period (or `cap` reached), or the period has ended",
                    [
                        PaymentRequired(
                            "No allowance is left this period",
                            code="allowance_exhausted",
                            granted=10,
                            used=10,
                            remaining=0,
                        ),
                        PaymentRequired(
                            "This period's allowance has expired",
                            code="allowance_expired",
                            granted=10,
                            used=4,
                            remaining=0,
                        ),
                    ],
                ),
                403: FORBIDDEN,
                409: (
                    "The reference drew from another allowance",
                    Conflict(
                        "This reference drew from another allowance",
                        code="reference_reused",
                        reference=REF,
                    ),
                ),
            }
        ),
        201: json_example({"draw": DRAW, "allowance": STATE, "given_back": None}, "Drawn"),
        200: json_example(
            {"draw": DRAW, "allowance": STATE, "given_back": None},
            "This reference drew before: the draw as it is now (`Idempotent-Replayed`)",
        ),
    },
)
async def draw_allowance(
    body: AllowanceDrawIn, request: Request, principal: CurrentPrincipal
) -> Response:
    """Take one unit for `reference` (once per reference, ever: a repeat replays the
    draw in its current state, whatever it is). The draw is provisional: confirm it when
    the work succeeded, return it when it failed; unconfirmed past `ttl_seconds` it
    expires and its unit comes back (the ledger's expiry sweep, or the next operation on
    it). 402 `allowance_exhausted` when none is left (or `cap` is reached), 402
    `allowance_expired` once the period has ended; a refused draw records nothing."""
    permit = _permit("ledger.allowance.draw", principal, request)
    permit.check_user(body.user_id)
    status, out, replayed = await draw(
        _pool(request),
        user_id=body.user_id,
        kind=body.kind,
        period=body.period,
        reference=body.reference,
        ttl_seconds=body.ttl_seconds,
        cap=body.cap,
        owner=permit.owner,
    )
    return model_response(status, out, AllowanceDrawResult, replayed=replayed)


@router.post(
    "/draws/{reference}/confirm",
    summary="Confirm a draw: its unit is spent",
    response_model=AllowanceDrawResult,
    responses={
        **_errors(
            {
                403: FORBIDDEN,
                404: NOT_FOUND,
                409: (
                    "The draw expired (its unit came back) or was returned",
                    [
                        Conflict(
                            "The draw expired before it was confirmed; its unit came back",
                            code="draw_expired",
                            draw={**DRAW_JSON, "status": "expired"},
                        ),
                        Conflict(
                            "The draw was already returned",
                            code="draw_already_returned",
                            draw={**DRAW_JSON, "status": "returned"},
                        ),
                    ],
                ),
            }
        ),
        200: json_example(
            {
                "draw": {**DRAW, "status": "confirmed", "resolved_at": "2026-11-26T10:28:02Z"},
                "allowance": STATE,
                "given_back": None,
            },
            "Confirmed (or confirmed before: `Idempotent-Replayed`)",
        ),
    },
)
async def confirm_draw(reference: str, request: Request, principal: CurrentPrincipal) -> Response:
    """Confirm an active draw (the work it paid for succeeded). At most once: a repeat
    replays. A draw past its TTL is expired instead and this is 409 `draw_expired` (its
    unit came back); a returned one is 409 `draw_already_returned`."""
    permit = _permit("ledger.allowance.confirm", principal, request)
    out, replayed = await confirm(
        _pool(request), reference=reference, holds=permit.holds, actor=permit.actor
    )
    return model_response(200, out, AllowanceDrawResult, replayed=replayed)


@router.post(
    "/draws/{reference}/return",
    summary="Return a draw: its unit comes back while the period lasts",
    response_model=AllowanceDrawResult,
    responses={
        **_errors(
            {
                403: FORBIDDEN,
                404: NOT_FOUND,
                409: (
                    "The draw was confirmed",
                    Conflict(
                        "The draw was already confirmed",
                        code="draw_already_confirmed",
                        draw={**DRAW_JSON, "status": "confirmed"},
                    ),
                ),
            }
        ),
        200: json_example(
            {
                "draw": {**DRAW, "status": "returned", "resolved_at": "2026-11-26T10:28:02Z"},
                "allowance": {**STATE, "used": 2, "remaining": 8},
                "given_back": True,
            },
            "Returned; `given_back` false on a replay or after the period ended",
        ),
    },
)
async def return_draw(reference: str, request: Request, principal: CurrentPrincipal) -> Response:
    """Give an active draw's unit back (the work it paid for failed). At most once: a
    repeat, or a return of an expired draw, replays and gives nothing more; after the
    period ended nothing comes back (`given_back` false). A reference never drawn is 404
    `draw_not_found`; a confirmed draw is 409 `draw_already_confirmed`."""
    permit = _permit("ledger.allowance.return", principal, request)
    out, replayed = await give_back(
        _pool(request), reference=reference, holds=permit.holds, actor=permit.actor
    )
    return model_response(200, out, AllowanceDrawResult, replayed=replayed)


@router.get(
    "",
    summary="A user's allowances for a month",
    response_model=AllowanceList,
    responses={
        **ERRORS,
        200: json_example(
            {"user_id": USER, "period": "2026-11", "items": [STATE]},
            "Granted, used and remaining per kind (none granted: no item)",
        ),
    },
)
async def list_allowances(
    user_id: UserId,
    request: Request,
    principal: CurrentPrincipal,
    period: Annotated[
        str | None,
        Query(pattern=r"^2[0-9]{3}-(0[1-9]|1[0-2])$", description="'YYYY-MM'; default: this month"),
    ] = None,
    kind: Annotated[str | None, Query(pattern=r"^[a-z][a-z0-9_]{0,31}$")] = None,
) -> Response:
    """The user's allowances for `period` (default: the current month, UTC): granted,
    used and remaining units per kind."""
    permit = _permit("ledger.allowance.read", principal, request)
    await _check_read(permit, _pool(request), user_id)
    period = period or period_of(datetime.now(UTC))
    items = await read(_pool(request), user_id, period, kind)
    return model_response(
        200, {"user_id": user_id, "period": period, "items": items}, AllowanceList
    )


async def _check_read(permit: Permit, pool: asyncpg.Pool, user_id: str) -> None:
    linked = None
    if permit.users.startswith("linked:"):
        async with pool.acquire() as conn:
            linked = bool(
                await conn.fetchval(
                    "SELECT 1 FROM ledger.app_links WHERE user_id = $1 AND app = $2",
                    user_id,
                    permit.users[7:],
                )
            )
    permit.check_user(user_id, linked)
