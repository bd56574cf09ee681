"""One pure-ASGI middleware for request ids, access logs, metrics, and the last line of
error handling.

Pure ASGI rather than BaseHTTPMiddleware: it adds no task or buffering per request,
which matters on the ledger's hot path and for SSE streams.

Whatever goes wrong, a client gets JSON in the kit's shape, never Starlette's plain-text
"Internal Server Error":
- a NUL in the path or query string is a 422 before any route runs (`%00` is the one
  defect URL decoding lets through; bodies are checked by `services.kit.schemas`);
- an exception no handler took becomes a 500 carrying the request id (and is logged
  with its traceback under that id);
- a lost database connection (`services.kit.db.is_disconnect`) is retried once when a
  retry is safe: GET/HEAD, or any request with an `Idempotency-Key` (the service
  replays or completes the first attempt under that key); otherwise, or if the retry
  fails too, a 503 with `Retry-After`.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import time
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.kit.db import is_disconnect, is_unavailable
from services.kit.errors import KuError, ServiceUnavailable, Unprocessable
from services.kit.logs import request_id_var
from services.kit.metrics import LATENCY, REQUESTS
from services.kit.schemas import INVALID_TEXT, INVALID_TEXT_MESSAGE

log = logging.getLogger("ku.access")
errors_log = logging.getLogger("ku.errors")
REQUEST_ID_HEADER = b"x-request-id"
IDEMPOTENCY_HEADER = b"idempotency-key"
_QUIET = {"/health", "/ready", "/metrics"}
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class InternalError(KuError):
    status_code = 500
    code = "internal_error"
    message = "Internal server error"


def _nul_in_url(scope: Scope) -> bool:
    return b"%00" in scope["query_string"] or "\x00" in scope["path"]


async def send_json_error(send: Send, error: KuError) -> None:
    body = orjson.dumps(error.body())
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    for name, value in (error.headers() or {}).items():
        headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# Set in a request's scope by the outermost RequestContextMiddleware.
CONTEXT_KEY = "ku.request_context"


class _RequestIds:
    """Request ids: this process's random 64-bit prefix and a counter, 32 hex digits
    like a uuid4's. A uuid4 reads the OS's random source on every call, a few percent
    of a small request's CPU; unique is all a request id needs to be."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = secrets.token_hex(8)
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


new_request_id = _RequestIds()


class RequestContextMiddleware:
    def __init__(
        self, app: ASGIApp, service: str, *, check_url: bool = True, retry: bool = True
    ) -> None:
        self.app = app
        self.service = service
        # The gateway turns this off: its compat routes answer in the seeds' shape, and
        # what it proxies is checked by the service it reaches.
        self.check_url = check_url
        # The retry after a lost database connection (and the recording of the request
        # body it needs); the gateway, which has no database, turns it off.
        self.retry = retry
        # Prometheus children by label values (the request counter's and the latency
        # histogram's, one lookup for both): `labels()` takes a lock and builds a key on
        # every call; routes and statuses are few, so this dict stays small.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or CONTEXT_KEY in scope:
            # Not HTTP, or already inside this middleware (an app that answers some
            # routes in front of its stack hands the rest to it: counted once).
            await self.app(scope, receive, send)
            return
        scope[CONTEXT_KEY] = True
        request_id = None
        retry = self.retry
        idempotent = retry and scope["method"] in _SAFE_METHODS
        for name, value in scope["headers"]:
            if name == REQUEST_ID_HEADER:
                request_id = value.decode("latin-1")[:128]
            elif name == IDEMPOTENCY_HEADER:
                idempotent = retry
        if not request_id:
            request_id = new_request_id()
        token = request_id_var.set(request_id)
        start = time.perf_counter()
        status = 500
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_HEADER, request_id.encode("latin-1")),
                ]
            await send(message)

        try:
            if self.check_url and _nul_in_url(scope):
                await send_json_error(
                    send_wrapper,
                    Unprocessable(INVALID_TEXT_MESSAGE, code=INVALID_TEXT, where="url"),
                )
                return
            received: list[Message] = []
            app_receive = _recording(receive, received) if idempotent else receive
            try:
                await self.app(scope, app_receive, send_wrapper)
            except Exception as error:
                if started:
                    raise
                if not (idempotent and is_disconnect(error)):
                    await self._fail(send_wrapper, error, request_id)
                    return
                errors_log.warning(
                    "database connection lost; retrying %s %s once",
                    scope["method"],
                    scope["path"],
                )
                try:
                    await self.app(scope, replaying(received, receive), send_wrapper)
                except Exception as again:
                    if started:
                        raise
                    await self._fail(send_wrapper, again, request_id)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            key = (scope["method"], path, status)
            children = self._children.get(key)
            if children is None:
                children = self._children[key] = (
                    REQUESTS.labels(self.service, scope["method"], path, str(status)),
                    LATENCY.labels(self.service, path),
                )
            children[0].inc()
            children[1].observe(elapsed)
            if scope["path"] not in _QUIET and log.isEnabledFor(logging.INFO):
                log.info(
                    "%s %s %s",
                    scope["method"],
                    scope["path"],
                    status,
                    extra={"ctx": {"status": status, "ms": round(elapsed * 1000, 2)}},
                )
            request_id_var.reset(token)

    async def _fail(self, send: Send, error: Exception, request_id: str) -> None:
        """The response for an exception no handler took: JSON, with the request id."""
        if is_unavailable(error):
            errors_log.warning("database unavailable: %s: %s", type(error).__name__, error)
            await send_json_error(
                send,
                _Retry(
                    "The database is unavailable; retry shortly",
                    code="database_unavailable",
                    request_id=request_id,
                ),
            )
            return
        errors_log.error("unhandled %s", type(error).__name__, exc_info=error)
        await send_json_error(send, InternalError(request_id=request_id))


class _Retry(ServiceUnavailable):
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


def _recording(receive: Receive, received: list[Message]) -> Receive:
    async def record() -> Message:
        message = await receive()
        if message["type"] == "http.request":
            received.append(message)
        return message

    return record


def replaying(received: list[Message], receive: Receive) -> Receive:
    """`receive`, with the messages already read handed out again first: the body the
    first attempt read, then whatever it had not read yet."""
    pending: list[Any] = list(received)

    async def replay() -> Message:
        if pending:
            message: Message = pending.pop(0)
            return message
        return await receive()

    return replay
