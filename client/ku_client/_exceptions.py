"""The exception tree, first: every error the client raises is a `KuError`.

A response with an error status becomes the subclass for its status (and, where the
API names one, its `code`); a transport failure that outlasts the retries becomes
`ConnectionFailed`. Each carries what the API said: `status`, `code`, `message`,
`detail` and the `request_id` to quote to Ku's operators.
"""

from __future__ import annotations

from typing import Any


class KuError(Exception):
    status: int | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        detail: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.code = code
        self.detail = detail or {}
        self.request_id = request_id

    def __str__(self) -> str:
        where = f" [{self.status} {self.code}]" if self.status else ""
        return f"{self.message}{where}"


class ConnectionFailed(KuError):
    """No answer from Ku (connection refused, reset or timed out) after every retry."""


class BadRequest(KuError):
    status = 400


class AuthenticationFailed(KuError):
    status = 401


class InsufficientCredits(KuError):
    """402: `detail` says how much is `available` and how much was `needed`."""

    status = 402


class PermissionDenied(KuError):
    status = 403


class NotFound(KuError):
    status = 404


class Conflict(KuError):
    """409: an idempotency key reused with another request, or a hold already resolved."""

    status = 409


class StorageFull(KuError):
    """413: the workspace quota; `detail` has needed, available and limit bytes."""

    status = 413


class UnsupportedContent(KuError):
    status = 415


class ValidationFailed(KuError):
    status = 422


class RateLimited(KuError):
    """429 after every retry; `retry_after` is the server's advice in seconds."""

    status = 429

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServerError(KuError):
    """5xx: Ku or one of its services failed; retried first when it is 502, 503 or 504."""


class ServiceUnavailable(ServerError):
    status = 503


BY_STATUS: dict[int, type[KuError]] = {
    400: BadRequest,
    401: AuthenticationFailed,
    402: InsufficientCredits,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: StorageFull,
    415: UnsupportedContent,
    422: ValidationFailed,
    429: RateLimited,
    503: ServiceUnavailable,
}


def error_for(status: int, body: Any, request_id: str | None, retry_after: float | None) -> KuError:
    """The typed error for an error response (native or compatibility body)."""
    cls = BY_STATUS.get(status, ServerError if status >= 500 else KuError)
    code: str | None = None
    detail: dict[str, Any] = {}
    message = f"HTTP {status}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message") or message)
        code = error.get("code")
        raw = error.get("detail")
        detail = raw if isinstance(raw, dict) else {}
    elif isinstance(error, str):  # the compatibility API's {"success": false, "error": "..."}
        message = error
        code = body.get("code")
    kwargs: dict[str, Any] = {
        "status": status,
        "code": code,
        "detail": detail,
        "request_id": request_id,
    }
    if cls is RateLimited:
        return RateLimited(message, retry_after=retry_after, **kwargs)
    return cls(message, **kwargs)
