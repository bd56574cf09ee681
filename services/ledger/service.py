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

    async def open_account(self, user_id: str, welcome_milli: int) -> Outcome:
        """Create the user's wallet and, once per user, the welcome grant."""
        op: dict[str, Any] = {
            "op": "open",
            "user_id": user_id,
            "amount": welcome_milli,
            "source": "welcome",
            "reference": "welcome",
            "description": "Welcome credits",
        }
        if welcome_milli > 0:
            # One key per user, whoever asks and however often: one welcome grant.
            op.update(
                key=f"welcome:{user_id}",
                scope="ledger:welcome",
                hash=request_hash({"user_id": user_id}),
            )
        result = await self.committer.submit(op)
        return Outcome(int(result["status"]), result["body"], bool(result.get("replayed")))


def idempotency_key(request: Request, natural: str | None) -> str | None:
    return key_from_request(request, natural)
