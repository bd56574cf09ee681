"""The error responses a route declares in its OpenAPI operation, with their examples.

    ERRORS = error_responses({
        404: "No such project (or not yours: the same answer)",
        413: ("The owner's storage quota would be exceeded", PayloadTooLarge(...)),
    })
    @router.post(..., responses=ERRORS)

Each status gets its description, the error body's schema and an example rendered by
the same `KuError.body()` the error handler sends, so an example cannot drift from
the wire. A status given only a description shows the kit's usual error for it
(`STANDARD`); give the route's own error(s) where it has a more telling one. The
gateway's compatibility API passes its own renderer and body model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, Field

from services.kit.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    KuError,
    NotFound,
    PayloadTooLarge,
    PaymentRequired,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
    Unprocessable,
    UpstreamError,
    UpstreamTimeout,
)


class ErrorInfo(BaseModel):
    code: str = Field(description="Machine-readable and stable: branch on this")
    message: str = Field(description="For people; may change")
    detail: dict[str, Any] | None = Field(None, description="Facts about this error, by code")


class ErrorBody(BaseModel):
    """Every error of the native API: `{"error": {"code", "message", "detail"}}`."""

    error: ErrorInfo


# The kit's usual error for each status, shown when a route gives only a description.
STANDARD: dict[int, KuError] = {
    400: BadRequest("Request body is not valid JSON", code="malformed_json"),
    401: Unauthorized(
        "Invalid or missing API key. Include X-API-Key header or api_key parameter.",
        code="invalid_api_key",
    ),
    402: PaymentRequired(available=3.5, required=5),
    403: Forbidden("Missing scope: one of ledger:read, ledger:write", code="missing_scope"),
    404: NotFound(
        "No ledger account for this user", code="unknown_user", user_id="101902121794505144784"
    ),
    409: Conflict(
        "This Idempotency-Key was used with a different request", code="idempotency_key_reused"
    ),
    413: PayloadTooLarge("Request body too large (limit 10485760 bytes)", limit=10485760),
    422: Unprocessable(
        "Invalid input",
        errors=[{"loc": ["body", "user_id"], "msg": "Field required", "type": "missing"}],
    ),
    429: TooManyRequests(retry_after=12),
    502: UpstreamError(),
    503: ServiceUnavailable(),
    504: UpstreamTimeout(),
}

Documented = str | tuple[str, KuError | Sequence[KuError]]


def json_example(example: Any, description: str) -> dict[str, Any]:
    """A success response's OpenAPI entry with its JSON example."""
    return {"description": description, "content": {"application/json": {"example": example}}}


def native_body(error: KuError) -> dict[str, Any]:
    return error.body()


def error_responses(
    declared: Mapping[int, Documented],
    *,
    render: Callable[[KuError], dict[str, Any]] = native_body,
    model: type[BaseModel] = ErrorBody,
) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status with its description, schema and example(s).
    Several errors for one status become named examples (by their codes)."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status, documented in declared.items():
        if isinstance(documented, str):
            description, errors = documented, [STANDARD[status]]
        else:
            description, given = documented
            errors = [given] if isinstance(given, KuError) else list(given)
        for error in errors:
            if error.status_code != status:
                raise ValueError(f"{error.code} is a {error.status_code}, documented as {status}")
        media: dict[str, Any]
        if len(errors) == 1:
            media = {"example": render(errors[0])}
        else:
            media = {
                "examples": {e.code: {"summary": e.message, "value": render(e)} for e in errors}
            }
        responses[status] = {
            "description": description,
            "model": model,
            "content": {"application/json": media},
        }
    return responses
