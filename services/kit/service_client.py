"""Calls from one service to another, as that service.

    client = ServiceClient(settings, me="generation")      # in the app's lifespan
    hold = await client.json("ledger", "POST", "/v1/ledger/holds", json={...},
                             idempotency_key=f"gen:{generation_id}:hold",
                             origin=request.headers.get(PRINCIPAL_HEADER))

Every request carries a principal for `me` (kind "service") signed for the target
service (`services.kit.principal.outgoing_header`): a principal signed for the
ledger is refused by the workspace, and a service can only ever sign as itself.
`origin` forwards the caller's own signed principal (what the gateway sent us) so
the target can check on whose behalf the service acts (a user's own money, a
partner's linked user).

Retries: connection failures, 502, 503 and 504 are retried with backoff, but only
for requests that are safe to repeat: GET/HEAD, or anything sent with an
idempotency key (the target applies it once). Errors come back as the kit error
the target raised (`error_from_response`), so callers handle 402/409/... by type.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from services.kit.config import KuSettings
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
from services.kit.logs import request_id_var
from services.kit.money import ku_to_milli
from services.kit.principal import (
    ORIGIN_HEADER,
    PRINCIPAL_HEADER,
    SignedPrincipal,
    service_principal,
)

log = logging.getLogger("ku.service_client")

_BY_STATUS: dict[int, type[KuError]] = {
    400: BadRequest,
    401: Unauthorized,
    402: PaymentRequired,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: Unprocessable,
    429: TooManyRequests,
    503: ServiceUnavailable,
    504: UpstreamTimeout,
}
RETRY_STATUSES = frozenset({502, 503, 504})
SAFE_METHODS = frozenset({"GET", "HEAD"})


def error_from_response(status: int, body: Any, service: str | None = None) -> KuError:
    """A service's `{"error": {code, message, detail}}` as the kit error it was raised as
    (the gateway's and every service client's one mapping)."""
    cls = _BY_STATUS.get(status, UpstreamError if status >= 500 else BadRequest)
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        if service is None:
            return cls()
        return cls(f"The {service} service answered {status}", service=service)
    raw_detail = error.get("detail")
    detail: dict[str, Any] = raw_detail if isinstance(raw_detail, dict) else {}
    if cls is TooManyRequests:
        detail = {k: v for k, v in detail.items() if k != "retry_after"}
    exc = cls(str(error.get("message") or cls.message), code=error.get("code"), **detail)
    exc.status_code = status if status in _BY_STATUS else exc.status_code
    return exc


class ServiceClient:
    def __init__(
        self,
        settings: KuSettings,
        *,
        me: str,
        timeout_seconds: float = 10.0,
        retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.me = me
        self.retries = retries
        # This service's signed header per target, re-signed every 20 s (a signature per
        # call costs CPU here, and a header seen before skips the target's check).
        self._me = SignedPrincipal(service_principal(me))
        self._http = httpx.AsyncClient(
            timeout=timeout_seconds,
            transport=transport,
            limits=httpx.Limits(max_connections=200, keepalive_expiry=4),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def url(self, service: str, path: str) -> str:
        return self.settings.service_url(service) + path

    def signed(self, service: str) -> str:
        """This service's principal header for `service` (`SignedPrincipal`)."""
        return self._me.header_for(service)

    def headers(self, service: str, *, origin: str | None = None) -> dict[str, str]:
        out = {PRINCIPAL_HEADER: self.signed(service)}
        if origin:
            out[ORIGIN_HEADER] = origin
        request_id = request_id_var.get()
        if request_id:
            out["x-request-id"] = request_id
        return out

    async def request(
        self,
        service: str,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        origin: str | None = None,
        timeout_seconds: float | None = None,
    ) -> httpx.Response:
        """One call; retried on connection errors and 502/503/504 when safe to repeat."""
        method = method.upper()
        retryable = method in SAFE_METHODS or idempotency_key is not None
        attempts = self.retries + 1 if retryable else 1
        for attempt in range(attempts):
            headers = self.headers(service, origin=origin)
            if idempotency_key is not None:
                headers["idempotency-key"] = idempotency_key
            try:
                response = await self._http.request(
                    method,
                    self.url(service, path),
                    json=json,
                    params=params,
                    headers=headers,
                    timeout=timeout_seconds
                    if timeout_seconds is not None
                    else httpx.USE_CLIENT_DEFAULT,
                )
            except httpx.TimeoutException:
                if attempt + 1 >= attempts:
                    raise UpstreamTimeout(
                        f"The {service} service timed out", service=service
                    ) from None
            except httpx.TransportError:
                if attempt + 1 >= attempts:
                    raise UpstreamError(
                        f"The {service} service is unreachable", service=service
                    ) from None
            else:
                if response.status_code not in RETRY_STATUSES or attempt + 1 >= attempts:
                    return response
            await asyncio.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")  # pragma: no cover

    async def json(self, service: str, method: str, path: str, **kwargs: Any) -> Any:
        """`request()`, returning the JSON body, raising the service's error for >= 400."""
        response = await self.request(service, method, path, **kwargs)
        try:
            body = response.json() if response.content else None
        except ValueError:
            body = None
        if response.status_code >= 400:
            raise error_from_response(response.status_code, body, service)
        return body


# Captures of a hold that clawbacks keep shrinking, at most (each a smaller amount).
CAPTURE_STEPS = 4
# A refusal of a capture that says how much of the hold can still be captured.
_CAPTURE_LIMITS = {"capture_exceeds_hold": "held", "hold_partly_expired": "capturable"}


async def capture_hold(
    capture: Callable[[int, str], Awaitable[object]],
    release: Callable[[], Awaitable[object]],
    amount_milli: int,
    key: str,
) -> int:
    """Capture `amount_milli` of a hold, `capture(amount_milli, idempotency_key)` calling
    the ledger; what was captured.

    Less may be capturable than the work cost, and the ledger says how much (docs/ledger.md,
    holds), keeping its refusal under the key for good:
    - a refund's clawback shrank the hold: 422 `capture_exceeds_hold`, `held`;
    - a lot the hold drew from expired meanwhile: 409 `hold_partly_expired`, `capturable`.
    That much is captured instead, under a key named by it (`<key>:held:<milli>`,
    `<key>:capturable:<milli>`), so a rerun (a story resumed, a retried job) meets the
    same answers and captures nothing more; nothing left, the hold is released (0).
    Never more than the hold, never nothing for work delivered while something is left."""
    amount, step_key = amount_milli, key
    for _ in range(CAPTURE_STEPS):
        try:
            await capture(amount, step_key)
        except (Unprocessable, Conflict) as exc:
            field = _CAPTURE_LIMITS.get(exc.code)
            left = exc.detail.get(field) if field else None
            if left is None:
                raise
            left_milli = ku_to_milli(left)
            if left_milli >= amount:  # not the ledger's answer: never charge more
                raise
            log.error(
                "capture %s: %s, %s milli-Ku left of the %s asked; capturing what is left",
                key,
                exc.code,
                left_milli,
                amount_milli,
            )
            if left_milli <= 0:
                await release()
                return 0
            amount, step_key = left_milli, f"{key}:{field}:{left_milli}"
            continue
        return amount
    raise Unprocessable("The hold kept shrinking under its capture", code="capture_exceeds_hold")
