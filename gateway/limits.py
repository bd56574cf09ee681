"""Every request body is bounded before anything reads it (pure ASGI, outermost but
for the request context).

- A `Content-Length` over the route's limit is refused with 413 at once: nothing of
  the body is read, nothing is authenticated, no route runs.
- A body without a length (chunked) is counted as it is received; the first chunk
  that passes the limit ends the request with 413 (the rest is never read).

Limits: the old clients' API (`/api/...`) takes small JSON bodies and is bounded by
KU_GATEWAY_COMPAT_MAX_BODY_BYTES (900,000: a 64 MB body is refused before 1 MB of it
is read, whether or not it says its length); everything else by
KU_GATEWAY_MAX_BODY_BYTES. The proxy applies the same limit to what it streams
upstream (`gateway.proxy`), so `/v1/...` is counted there.

A proxied request (`gateway.proxy.proxied`) does not pass through this middleware: the
proxy applies the same rule (`limit_for`, `declared_length`, `refuse`) in its own pass
over the headers, before anything else, and counts unsized bodies as it streams them.
"""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.config import GatewaySettings
from services.kit.errors import PayloadTooLarge

COMPAT_PREFIX = "/api/"


class _Overflow(Exception):
    """Raised into the app when a body passes its limit."""


def _body(path: str, limit: int) -> bytes:
    message = f"Request body too large (limit {limit} bytes)"
    if path.startswith(COMPAT_PREFIX):
        # The seeds' clients know one 413: a save that does not fit their storage.
        error = "Storage limit exceeded" if path.endswith("/save-project") else message
        return orjson.dumps(
            {"success": False, "error": error, "details": message, "code": "payload_too_large"}
        )
    return orjson.dumps(PayloadTooLarge(message, limit=limit).body())


def limit_for(settings: GatewaySettings, path: str) -> int:
    """The largest body `path` takes."""
    if path.startswith(COMPAT_PREFIX):
        return settings.gateway_compat_max_body_bytes
    return settings.gateway_max_body_bytes


def declared_length(value: bytes) -> int:
    """A Content-Length header's length; -1 when the value is not one (refused)."""
    return int(value) if value.isdigit() else -1


async def refuse(send: Send, path: str, limit: int) -> None:
    """The 413 for a body over `limit` (the connection is closed after it)."""
    body = _body(path, limit)
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, settings: GatewaySettings) -> None:
        self.app = app
        self.settings = settings

    def limit_for(self, path: str) -> int:
        return limit_for(self.settings, path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        limit = self.limit_for(path)
        length = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = declared_length(value)
                break
        if length is not None and (length > limit or length < 0):
            await refuse(send, path, limit)
            return
        if length is not None or path.startswith("/v1/"):
            # A declared length is enforced by the server (it never delivers more);
            # the proxy counts unsized /v1 bodies as it streams them.
            await self.app(scope, receive, send)
            return

        received = 0
        overflowed = refused = False

        async def counted() -> Message:
            nonlocal received, overflowed
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    overflowed = True
                    raise _Overflow
            return message

        async def guarded(message: Message) -> None:
            # Whatever the app makes of the cut-off body (a framework may turn it into
            # a 400), the client gets the 413.
            nonlocal refused
            if overflowed:
                if not refused and message["type"] == "http.response.start":
                    refused = True
                    await refuse(send, path, limit)
                return
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not overflowed:
                raise
        if overflowed and not refused:
            await refuse(send, path, limit)
