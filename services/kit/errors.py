"""One error tree; every error carries its HTTP status and a machine-readable code.

Rendered one way by `install_error_handlers`:
    {"error": {"code": "insufficient_credits", "message": "...", "detail": {...}}}
The gateway's compatibility API renders the same errors in the seeds' shape.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from services.kit.schemas import INVALID_TEXT, INVALID_TEXT_MESSAGE


class KuError(Exception):
    status_code = 400
    code = "bad_request"
    message = "Bad request"

    def __init__(
        self, message: str | None = None, *, code: str | None = None, **detail: Any
    ) -> None:
        self.message = message or self.message
        if code:
            self.code = code
        self.detail = detail
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail:
            error["detail"] = self.detail
        return {"error": error}

    def headers(self) -> dict[str, str] | None:
        return None


class BadRequest(KuError):
    status_code = 400
    code = "bad_request"


class Unauthorized(KuError):
    status_code = 401
    code = "unauthorized"
    message = "Authentication required"


class PaymentRequired(KuError):
    status_code = 402
    code = "insufficient_credits"
    message = "Insufficient credits"


class Forbidden(KuError):
    status_code = 403
    code = "forbidden"
    message = "Not allowed"


class NotFound(KuError):
    status_code = 404
    code = "not_found"
    message = "Not found"


class Conflict(KuError):
    status_code = 409
    code = "conflict"
    message = "Conflict"


class PayloadTooLarge(KuError):
    status_code = 413
    code = "payload_too_large"
    message = "Payload too large"


class Unprocessable(KuError):
    status_code = 422
    code = "validation_error"
    message = "Invalid input"


class TooManyRequests(KuError):
    status_code = 429
    code = "rate_limited"
    message = "Too many requests"

    def __init__(self, message: str | None = None, *, retry_after: int = 1, **detail: Any):
        super().__init__(message, retry_after=retry_after, **detail)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class UpstreamError(KuError):
    status_code = 502
    code = "upstream_error"
    message = "An upstream service failed"


class UpstreamTimeout(KuError):
    status_code = 504
    code = "upstream_timeout"
    message = "An upstream service timed out"


class ServiceUnavailable(KuError):
    status_code = 503
    code = "unavailable"
    message = "Service unavailable"


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
}


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        malformed = BadRequest("Request body is not valid JSON", code="malformed_json")
        return JSONResponse(malformed.body(), status_code=malformed.status_code)
    fields = [
        {
            "loc": [str(p) for p in e.get("loc", ())],
            "msg": str(e.get("msg", "")),
            "type": e.get("type"),
        }
        for e in errors
    ]
    if all(f["type"] == INVALID_TEXT for f in fields):
        # Only NUL / unpaired surrogates: say so in the code, as the old checks did.
        err = Unprocessable(INVALID_TEXT_MESSAGE, code=INVALID_TEXT, errors=fields)
    else:
        err = Unprocessable("Invalid input", errors=fields)
    return JSONResponse(err.body(), status_code=422)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(KuError)
    async def _ku_error(_: Request, exc: KuError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = http_error(exc).body()
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def http_error(exc: StarletteHTTPException) -> KuError:
    """Starlette's own HTTP errors (routing's 404/405, a body that cannot be parsed) as
    the kit error they stand for."""
    error = KuError(str(exc.detail), code=_STATUS_CODES.get(exc.status_code, "error"))
    error.status_code = exc.status_code
    return error
