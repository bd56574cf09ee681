"""The ledger's rules on the Python side: who may do what, idempotency keys, and
turning `ledger.apply()` results into responses or errors. The money movement
itself happens in SQL (sql/ledger_v1.sql) through the group committer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request

from services.kit.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    KuError,
    NotFound,
    PaymentRequired,
    Unprocessable,
)
from services.kit.idempotency import key_from_request, request_hash
from services.kit.money import milli_to_ku
from services.kit.principal import Principal
from services.ledger.batcher import GroupCommitter

_ERRORS: dict[int, type[KuError]] = {
    400: BadRequest,
    402: PaymentRequired,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    422: Unprocessable,
}


@dataclass
class Outcome:
    status_code: int
    body: dict[str, Any]
    replayed: bool


def _ku_detail(detail: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in detail.items():
        if key.endswith("_milli") and isinstance(value, int):
            out[key[:-6]] = milli_to_ku(value)
        else:
            out[key] = value
    return out


class Ledger:
    def __init__(self, committer: GroupCommitter) -> None:
        self.committer = committer

    async def execute(
        self,
        op: dict[str, Any],
        principal: Principal,
        *,
        key: str | None,
        require_key: bool = True,
    ) -> Outcome:
        """Run one operation. `key` is the Idempotency-Key or a natural reference."""
        if key is None and require_key:
            raise BadRequest(
                "Send an Idempotency-Key header or a reference so a retry cannot charge twice",
                code="idempotency_key_required",
            )
        if key is not None:
            op = {
                **op,
                "key": key,
                "scope": principal.idempotency_scope,
                "hash": request_hash(op),
            }
        result = await self.committer.submit(op)
        status = int(result["status"])
        if status >= 400:
            error = result["error"]
            cls = _ERRORS.get(status, BadRequest)
            raise cls(error["message"], code=error["code"], **_ku_detail(error.get("detail") or {}))
        return Outcome(status, result["body"], bool(result.get("replayed")))

    async def open_account(
        self, user_id: str, amount_milli: int, *, audit: dict[str, str] | None = None
    ) -> Outcome:
        """Create the user's wallet and, once per user, its first grant: the welcome
        credits, or an admin's initial credits instead (`audit` set). Both ride on one
        key per user, so however the requests race (the `user.created` event, an admin's
        create-user and its retries) there is one first grant; a later request for a
        different first grant changes nothing."""
        initial = audit is not None
        op: dict[str, Any] = {
            "op": "open",
            "user_id": user_id,
            "amount": amount_milli,
            "source": "admin" if initial else "welcome",
            "reference": "initial" if initial else "welcome",
            "description": "Initial credits" if initial else "Welcome credits",
            # Opened by the ledger itself (its consumer) or after the route's table check.
            "auth": {"user": "any", "owner": "service:ledger", "holds": "*", "charges": "*"},
        }
        if audit:
            op["auth"]["audit"] = audit
        if amount_milli > 0:
            op.update(
                key=f"welcome:{user_id}",
                scope="ledger:welcome",
                hash=request_hash({"user_id": user_id, "amount": amount_milli, "initial": initial}),
            )
        result = await self.committer.submit(op)
        if int(result["status"]) == 409:
            # The user's first grant happened already, with other terms: nothing to do.
            return Outcome(200, {"user_id": user_id, "created": False}, True)
        return Outcome(int(result["status"]), result["body"], bool(result.get("replayed")))


def idempotency_key(request: Request, natural: str | None) -> str | None:
    return key_from_request(request, natural)
