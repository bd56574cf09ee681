"""`/api/unified/*`: credits and users for Penora, ImageGene and partners.

Each endpoint is a thin translation onto the native APIs: the ledger for
balances, debits and the journal; auth for users; the workspace for storage.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from gateway.access import authenticated
from gateway.upstream import Upstreams, error_from_upstream
from services.kit.errors import KuError
from services.kit.money import PositiveKu, milli_to_ku
from services.kit.principal import SignedPrincipal
from services.kit.schemas import Description, Reference, Text, UserId

MB = 1024 * 1024
INITIAL_REASON = "initial credits (create-user)"
APPS = ("penora", "imagegene")


def _as_text(value: Any) -> Any:
    # Old clients may send an SSO id as a JSON number; ids are strings everywhere.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


CompatUserId = Annotated[UserId, BeforeValidator(_as_text)]
Caller = Annotated[SignedPrincipal, Depends(authenticated())]
MoneyCaller = Annotated[SignedPrincipal, Depends(authenticated(money=True))]


class DeductCredits(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "user_id": "101902121794505144784",
                    "amount": 5,
                    "app_name": "imagegene",
                    "description": "AI image generation - 1024x1024 artwork",
                    "project_code": "img_xyz123",
                }
            ]
        },
    )
    user_id: CompatUserId
    amount: PositiveKu
    app_name: Text | None = Field(None, description="Defaults to the calling app")
    description: Description | None = None
    project_code: Reference | None = Field(
        None, description="Retrying with the same project code never charges twice"
    )


class CreateUser(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "user_id": "101902121794505144784",
                    "username": "Test User",
                    "email": "test@example.com",
                }
            ]
        },
    )
    user_id: CompatUserId
    username: Text | None = Field(None, max_length=200)
    email: Text | None = Field(None, max_length=320)
    initial_credits: PositiveKu | None = Field(
        None, description="Ignored unless the key has the admin scope"
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _upstreams(request: Request) -> Upstreams:
    return request.app.state.gateway.upstreams


def _storage(data: dict[str, Any] | None) -> dict[str, Any]:
    used = int(data.get("used_bytes", 0)) if data else 0
    limit = int(data.get("limit_bytes", 0)) if data else 0
    available = max(0, limit - used)
    return {
        "used_mb": round(used / MB, 2),
        "remaining_mb": round(available / MB, 2),
        "available_mb": round(available / MB, 2),
        "total_mb": round(limit / MB, 2),
        "limit_mb": round(limit / MB, 2),
        "usage_percentage": float(data.get("percent", 0)) if data else 0.0,
        "total_projects": int(data.get("project_count", 0)) if data else 0,
    }


async def _workspace_storage(
    upstreams: Upstreams, identity: SignedPrincipal, user_id: str
) -> dict[str, Any] | None:
    """The workspace's figures if it answers; the old API showed zeros otherwise."""
    try:
        status, body = await upstreams.call(
            "workspace",
            "GET",
            "/v1/workspace/storage",
            principal=identity,
            params={"user_id": user_id},
            timeout_seconds=2,
        )
    except KuError:
        return None
    return body if status == 200 and isinstance(body, dict) else None


# The old clients' transaction listing example: two of Penora's (both lists show them).
_EXAMPLE_TRANSACTIONS = [
    {
        "id": 17,
        "type": "debit",
        "app_name": "penora",
        "amount": 2,
        "credits_change": -2,
        "description": "Story chapter",
        "project_code": "PN1234",
        "timestamp": "2026-11-26T10:34:03Z",
    },
    {
        "id": 16,
        "type": "release",
        "app_name": "penora",
        "amount": 0,
        "credits_change": 2,
        "description": "Image enhancement (lighting)",
        "project_code": "enhancement:ffa6a6b6-8be2-5527-99b4-7c99c133c693",
        "timestamp": "2026-11-26T10:34:02Z",
    },
]


def register(router: APIRouter) -> None:
    @router.get(
        "/user-info",
        summary="A user's credits and storage (old clients)",
        responses={
            200: {
                "content": {
                    "application/json": {
                        "example": {
                            "success": True,
                            "user_id": "101902121794505144784",
                            "credits": 38.55,
                            "held_credits": 0,
                            "storage": {
                                "used_mb": 0.0,
                                "remaining_mb": 5.0,
                                "available_mb": 5.0,
                                "total_mb": 5.0,
                                "limit_mb": 5.0,
                                "usage_percentage": 0.0,
                                "total_projects": 2,
                            },
                            "timestamp": "2026-11-26T10:34:03Z",
                        }
                    }
                }
            }
        },
    )
    async def user_info(
        request: Request, identity: Caller, user_id: Annotated[CompatUserId, Query()]
    ) -> dict[str, Any]:
        """A user's spendable credits (Ku) and shared storage."""
        identity.principal.acts_for(user_id)
        upstreams = _upstreams(request)
        balance, storage = await asyncio.gather(
            upstreams.json(
                "ledger",
                "GET",
                "/v1/ledger/balance",
                principal=identity,
                params={"user_id": user_id},
            ),
            _workspace_storage(upstreams, identity, user_id),
        )
        return {
            "success": True,
            "user_id": user_id,
            "credits": balance["available"],
            "held_credits": balance["held"],
            "storage": _storage(storage),
            "timestamp": _now(),
        }

    @router.post(
        "/deduct-credits",
        summary="Spend a user's credits once (old clients)",
        responses={
            200: {
                "content": {
                    "application/json": {
                        "example": {
                            "success": True,
                            "credits_deducted": 2,
                            "new_balance": 36.55,
                            "app_name": "penora",
                            "transaction_id": 17,
                            "timestamp": "2026-11-26T10:34:03Z",
                        }
                    }
                }
            }
        },
    )
    async def deduct_credits(
        request: Request, response: Response, body: DeductCredits, identity: MoneyCaller
    ) -> dict[str, Any]:
        """Spend a user's credits once: a retry with the same `project_code`
        (or `Idempotency-Key` header) replays the first result."""
        principal = identity.principal
        principal.acts_for(body.user_id)
        app = (body.app_name or principal.app or "unknown").strip().lower()
        key = request.headers.get("idempotency-key")
        if not key and body.project_code:
            # Per user: two users' deductions may carry the same project code.
            digest = hashlib.sha256(f"{body.user_id}\0{body.project_code}".encode()).hexdigest()
            key = f"deduct:{digest}"
        if not key:
            # Old clients sent neither; they get the old (non-retryable) behaviour.
            key = f"compat-{uuid.uuid4().hex}"
        headers = {"Idempotency-Key": key}
        debit: dict[str, Any] = {
            "user_id": body.user_id,
            "amount": milli_to_ku(body.amount),
            "app": app,
        }
        if body.description:
            debit["description"] = body.description
        if body.project_code:
            debit["reference"] = body.project_code
        result = await _upstreams(request).json(
            "ledger",
            "POST",
            "/v1/ledger/debits",
            principal=identity,
            json=debit,
            headers=headers,
        )
        return {
            "success": True,
            "credits_deducted": result["amount"],
            "new_balance": result["available"],
            "app_name": result["app"],
            "transaction_id": result["transaction_id"],
            "timestamp": _now(),
        }

    @router.get(
        "/transactions",
        summary="A user's recent transactions (old clients)",
        responses={
            200: {
                "content": {
                    "application/json": {
                        "example": {
                            "success": True,
                            "all_transactions": _EXAMPLE_TRANSACTIONS,
                            "penora_transactions": _EXAMPLE_TRANSACTIONS,
                            "imagegene_transactions": [],
                            "total_count": 2,
                        }
                    }
                }
            }
        },
    )
    async def transactions(
        request: Request,
        identity: Caller,
        user_id: Annotated[CompatUserId, Query()],
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
    ) -> dict[str, Any]:
        """The user's recent transactions, all apps and split by app."""
        identity.principal.acts_for(user_id)
        page = await _upstreams(request).json(
            "ledger",
            "GET",
            "/v1/ledger/transactions",
            principal=identity,
            params={"user_id": user_id, "limit": limit},
        )
        items = [_transaction(t) for t in page["items"]]
        out: dict[str, Any] = {"success": True, "all_transactions": items}
        for app in APPS:
            out[f"{app}_transactions"] = [t for t in items if t["app_name"] == app]
        out["total_count"] = len(items)
        return out

    @router.post("/create-user", summary="Create a user with the welcome credits (old clients)")
    async def create_user(
        request: Request, response: Response, body: CreateUser, identity: MoneyCaller
    ) -> dict[str, Any]:
        """Create a user (idempotent) and open their account with the welcome credits;
        answers once those credits are spendable."""
        principal = identity.principal
        principal.require_scope("users:write")
        upstreams = _upstreams(request)
        # Initial credits replace the welcome grant: auth's `user.created` event carries
        # them, and the ledger opens the account with them under the user's one
        # first-grant key, so the event and this request (and its retries) make one grant.
        initial = body.initial_credits if principal.is_admin else None
        user: dict[str, Any] = {
            "user_id": body.user_id,
            "username": body.username,
            "email": body.email,
        }
        if initial is not None:
            user["initial_credits"] = milli_to_ku(initial)
            user["reason"] = INITIAL_REASON
        status, answer = await upstreams.call(
            "auth",
            "POST",
            "/v1/users",
            principal=identity,
            json={k: v for k, v in user.items() if v is not None},
        )
        if status >= 400 and status != 409:  # 409: the user exists; nothing to change
            raise error_from_upstream(status, answer)
        created = status == 201  # auth knows; the ledger's answer may be a replay
        opening: dict[str, Any] = {"user_id": body.user_id, "welcome": initial is None}
        if initial is not None and created:
            opening.update(initial_credits=milli_to_ku(initial), reason=INITIAL_REASON)
        # (A retry that finds the user already there opens no grant of its own: the
        # first request and auth's event carry the initial credits.)
        account = await upstreams.json(
            "ledger", "POST", "/v1/ledger/accounts", principal=identity, json=opening
        )
        credits = account.get("available")
        if not created:  # the account answer may be the first call's replay: read it fresh
            status, balance = await upstreams.call(
                "ledger",
                "GET",
                "/v1/ledger/balance",
                principal=identity,
                params={"user_id": body.user_id},
            )
            credits = balance["available"] if status == 200 else None
        response.status_code = 201 if created else 200
        return {
            "success": True,
            "user_id": body.user_id,
            "username": body.username,
            "email": body.email,
            "credits": credits,
            "created": created,
            "message": "User created" if created else "User already exists",
            "timestamp": _now(),
        }

    @router.get(
        "/health",
        summary="The compatibility API answers",
        responses={
            200: {
                "content": {
                    "application/json": {
                        "example": {
                            "success": True,
                            "status": "healthy",
                            "service": "ku",
                            "timestamp": "2026-11-26T10:34:03Z",
                        }
                    }
                }
            }
        },
        openapi_extra={"security": []},
    )
    async def health() -> dict[str, Any]:
        """The compatibility API answers."""
        return {"success": True, "status": "healthy", "service": "ku", "timestamp": _now()}


def _transaction(t: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": t["id"],
        "type": t["kind"],
        "app_name": t.get("app"),
        "amount": t["amount"],
        "credits_change": t["delta"],
        "description": t.get("description"),
        "project_code": t.get("reference"),
        "timestamp": t["created_at"],
    }
