"""The ledger's rules on the Python side: idempotency keys, the authority each
operation carries, and turning `ledger.apply()` results into responses or errors.
The money movement, and the authority checks that depend on the data (whose user,
whose hold, whose charge), happen in SQL (sql/, the newest file defining each
function) through the group committer."""

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
    ServiceUnavailable,
    Unprocessable,
)
from services.kit.idempotency import key_from_request, request_hash
from services.kit.money import milli_to_ku
from services.kit.principal import Principal
from services.ledger.batcher import GroupCommitter, LedgerUnavailable

_ERRORS: dict[int, type[KuError]] = {
    400: BadRequest,
    402: PaymentRequired,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    422: Unprocessable,
}


class LedgerError(KuError):
    """An operation the database refused for a reason that is not a business rule."""

    status_code = 500
    code = "ledger_error"
    message = "The ledger could not apply this operation"


@dataclass
class Outcome:
    status_code: int
    body: dict[str, Any]
    replayed: bool


@dataclass(frozen=True)
class Keys:
    """The idempotency keys of one request: the Idempotency-Key header and the natural
    key built from its `reference`. Either may be missing; both are checked and the
    outcome is stored under both, so neither can be reused with other parameters."""

    header: str | None
    natural: str | None

    @property
    def primary(self) -> str | None:
        return self.header or self.natural


def service_authority(principal: Principal) -> dict[str, Any]:
    """The authority of the ledger's own in-process callers (billing, the welcome
    consumer): a service acts in its own lane for any user."""
    name = principal.app or "ledger"
    return {
        "user": "any",
        "owner": f"service:{name}",
        "holds": f"service:{name}",
        "charges": name,
    }


def _replayed_headers() -> dict[str, str]:
    return {"Idempotent-Replayed": "true"}


def _ku_detail(detail: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in detail.items():
        if key.endswith("_milli") and isinstance(value, int):
            out[key[:-6]] = milli_to_ku(value)
        else:
            out[key] = value
    return out


def result_error(result: dict[str, Any]) -> KuError:
    """A failed `ledger.apply` result as the KuError the single routes raise."""
    status = int(result["status"])
    error = result["error"]
    detail = _ku_detail(error.get("detail") or {})
    cls = LedgerError if status >= 500 else _ERRORS.get(status, BadRequest)
    return cls(error["message"], code=error["code"], **detail)


class Ledger:
    def __init__(self, committer: GroupCommitter) -> None:
        self.committer = committer

    def prepare(
        self,
        op: dict[str, Any],
        principal: Principal,
        *,
        key: str | Keys | None,
        require_key: bool = True,
        auth: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The operation as `ledger.apply` takes it: its authority (see docs/ledger.md
        "Authority"; SQL denies an operation without one) and its idempotency fields.
        `key` is the request's Keys, or one key. Raises the request's 4xx."""
        keys = key if isinstance(key, Keys) else Keys(header=key, natural=None)
        if keys.primary is None and require_key:
            raise BadRequest(
                "Send an Idempotency-Key header or a reference so a retry cannot charge twice",
                code="idempotency_key_required",
            )
        # The authority may come as an argument or inside the op (as the authority
        # module's callers put it); either way it is not part of the request's hash.
        params = {k: v for k, v in op.items() if k != "auth"}
        if auth is None:
            auth = op.get("auth")
        if auth is None and principal.kind == "service":
            auth = service_authority(principal)
        op = {**params, "auth": auth}
        if keys.primary is not None:
            try:
                digest = request_hash(params)
            except TypeError:  # text that is not UTF-8 (a lone surrogate): nothing to store
                raise Unprocessable(
                    "The operation holds text that is not UTF-8", code="invalid_input"
                ) from None
            op.update(key=keys.primary, scope=principal.idempotency_scope, hash=digest)
            if keys.header and keys.natural:
                op["alt_key"] = keys.natural
        return op

    async def execute(
        self,
        op: dict[str, Any],
        principal: Principal,
        *,
        key: str | Keys | None,
        require_key: bool = True,
        auth: dict[str, Any] | None = None,
    ) -> Outcome:
        """Run one operation (see `prepare`); a failure is raised as its KuError."""
        prepared = self.prepare(op, principal, key=key, require_key=require_key, auth=auth)
        result = await self._submit(prepared)
        status = int(result["status"])
        if status >= 400:
            exc = result_error(result)
            if result.get("replayed"):
                exc.headers = _replayed_headers  # type: ignore[method-assign]
            raise exc
        return Outcome(status, result["body"], bool(result.get("replayed")))

    async def execute_many(self, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run prepared operations through the committer (grouped into `apply_batch`
        statements of at most KU_BATCH_MAX_OPS); results in order, failures included."""
        return await self.committer.submit_many(ops)

    async def claim_batch(self, principal: Principal, key: str, digest: str) -> bytes | None:
        """Claim a batch's Idempotency-Key (`ledger.idempotency_keys`, scope
        `batch:<caller>`): None to go on, the stored answer to replay, or 409 when the
        key came with other operations. A claim with no answer yet (a concurrent
        duplicate, or a first attempt that died) goes on: its items replay under their
        own keys, so nothing applies twice."""
        scope = f"batch:{principal.idempotency_scope}"
        async with self.committer.pool.acquire() as conn:
            row = await conn.fetchrow(
                "WITH claimed AS (INSERT INTO ledger.idempotency_keys (scope, key, request_hash)"
                " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING key)"
                " SELECT request_hash, response::text AS response FROM ledger.idempotency_keys"
                " WHERE scope = $1 AND key = $2 AND NOT EXISTS (SELECT 1 FROM claimed)",
                scope,
                key,
                digest,
            )
        if row is None:
            return None
        if row["request_hash"] != digest:
            raise Conflict(
                "This Idempotency-Key was used with a different batch",
                code="idempotency_key_reused",
            )
        return None if row["response"] is None else row["response"].encode()

    async def store_batch(self, principal: Principal, key: str, digest: str, raw: bytes) -> None:
        """The batch's first complete answer, for its replays (first writer wins)."""
        async with self.committer.pool.acquire() as conn:
            await conn.execute(
                "UPDATE ledger.idempotency_keys SET status_code = 200, response = $4::jsonb"
                " WHERE scope = $1 AND key = $2 AND request_hash = $3 AND response IS NULL",
                f"batch:{principal.idempotency_scope}",
                key,
                digest,
                raw.decode(),
            )

    async def _submit(self, op: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self.committer.submit(op)
        except LedgerUnavailable as exc:
            # The database stayed unreachable through the committer's retries. Safe to
            # retry with the same key: the operation applied once or not at all.
            raise ServiceUnavailable(
                "The ledger's database is unavailable; retry with the same key",
                code="ledger_unavailable",
            ) from exc

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
        result = await self._submit(op)
        status = int(result["status"])
        if status == 409:
            # The user's first grant happened already, with other terms: nothing to do.
            return Outcome(200, {"user_id": user_id, "created": False}, True)
        if status >= 400:
            error = result["error"]
            cls = _ERRORS.get(status, LedgerError)
            raise cls(error["message"], code=error["code"])
        return Outcome(int(result["status"]), result["body"], bool(result.get("replayed")))


def idempotency_key(request: Request, natural: str | None) -> Keys:
    """Both keys of a request: the header (validated) and the natural reference."""
    header = key_from_request(request, None)
    return Keys(header=header, natural=natural)
