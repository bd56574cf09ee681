"""One pure-ASGI middleware for request ids, access logs and metrics.

Pure ASGI rather than BaseHTTPMiddleware: it adds no task or buffering per request,
which matters on the ledger's hot path and for SSE streams.
"""

from __future__ import annotations

import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.kit.logs import request_id_var
from services.kit.metrics import LATENCY, REQUESTS

log = logging.getLogger("ku.access")
REQUEST_ID_HEADER = b"x-request-id"
_QUIET = {"/health", "/ready", "/metrics"}


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope["headers"]:
            if name == REQUEST_ID_HEADER:
                request_id = value.decode("latin-1")[:128]
                break
        if not request_id:
            request_id = uuid.uuid4().hex
        token = request_id_var.set(request_id)
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_HEADER, request_id.encode("latin-1")),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            REQUESTS.labels(self.service, scope["method"], path, str(status)).inc()
            LATENCY.labels(self.service, path).observe(elapsed)
            if scope["path"] not in _QUIET and log.isEnabledFor(logging.INFO):
                log.info(
                    "%s %s %s",
                    scope["method"],
                    scope["path"],
                    status,
                    extra={"ctx": {"status": status, "ms": round(elapsed * 1000, 2)}},
                )
            request_id_var.reset(token)
