"""Kit errors rendered in the old clients' shape: `{"success": false, "error": ...}`.

The one mapping from a `KuError` (raised here or by a service and re-raised by
`gateway.upstream.error_from_upstream`) to the seeds' bodies and status codes.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

from gateway.auth import INVALID_KEY
from services.kit.errors import KuError, NotFound, PaymentRequired, Unprocessable
from services.kit.money import ku_to_milli, milli_to_ku
from services.kit.openapi import STANDARD, error_responses
from services.kit.schemas import INVALID_TEXT, INVALID_TEXT_MESSAGE


def _credits(value: Any) -> str:
    amount = milli_to_ku(ku_to_milli(value))
    return f"{amount} credit" if amount == 1 else f"{amount} credits"


def compat_body(exc: KuError) -> dict[str, Any]:
    status = exc.status_code
    detail = exc.detail or {}
    body: dict[str, Any] = {"success": False, "error": exc.message, "code": exc.code}
    if status == 401:
        body["error"] = INVALID_KEY
    elif status == 402:
        body["error"] = "Insufficient credits"
        if "available" in detail and "required" in detail:
            body["details"] = (
                f"User has {_credits(detail['available'])} "
                f"but needs {_credits(detail['required']).split(' ')[0]}"
            )
            body["credits"] = detail["available"]
    elif status == 404 and exc.code == "unknown_user":
        body["error"] = "User not found"
    elif status == 422:
        body["error"] = exc.message if exc.code != "validation_error" else "Invalid input"
        errors = detail.get("errors")
        if isinstance(errors, list) and errors:
            body["details"] = "; ".join(
                f"{'.'.join(e.get('loc', [])[1:]) or 'body'}: {e.get('msg')}" for e in errors
            )
    elif status == 429:
        body["error"] = "Rate limit exceeded"
        retry = getattr(exc, "retry_after", None)
        if retry is not None:
            body["details"] = f"Retry after {retry} seconds"
    elif status == 500 and "request_id" in detail:
        body["request_id"] = detail["request_id"]  # what to quote to support
    return body


def compat_response(exc: KuError) -> JSONResponse:
    return JSONResponse(compat_body(exc), status_code=exc.status_code, headers=exc.headers())


def from_validation(exc: RequestValidationError) -> KuError:
    errors = exc.errors()
    if any(e.get("loc", ())[-1:] == ("user_id",) and e.get("type") == "missing" for e in errors):
        return Unprocessable("User ID required", code="user_id_required")
    fields = [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in errors
    ]
    if all(e.get("type") == INVALID_TEXT for e in errors):
        return Unprocessable(INVALID_TEXT_MESSAGE, code=INVALID_TEXT, errors=fields)
    return Unprocessable("Invalid input", errors=fields)


class CompatError(BaseModel):
    """Every error of the compatibility API, in the seeds' shape."""

    success: Literal[False]
    error: str = Field(description="For people (the seeds' texts)")
    code: str = Field(description="Machine-readable: the native API's error code")
    details: str | None = Field(None, description="What was wrong, when known")
    credits: float | None = Field(None, description="402: the user's spendable Ku")


# The compatibility routes' error responses, rendered by `compat_body` like the wire.
ERRORS = error_responses(
    {
        400: "Malformed request",
        401: "Missing or invalid API key (or token)",
        402: (
            "`insufficient_credits` (deduct-credits, enhance-image)",
            PaymentRequired(available=3.5, required=5),
        ),
        403: "Missing scope, or a user token naming another user",
        404: (
            "Unknown user, project or task",
            [
                NotFound("No ledger account for this user", code="unknown_user"),
                NotFound("No such project", code="project_not_found"),
            ],
        ),
        409: "Idempotency-Key (or project_code) reused with another request",
        413: "Request body or storage quota too large",
        422: (
            "Invalid input (`user_id_required` when it is missing)",
            [
                Unprocessable("User ID required", code="user_id_required"),
                STANDARD[422],
            ],
        ),
        429: "Rate limited: retry after `Retry-After` seconds",
        502: "A service behind the gateway failed",
        503: "A service behind the gateway is unavailable",
        504: "A service behind the gateway timed out",
    },
    render=compat_body,
    model=CompatError,
)
