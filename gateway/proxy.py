"""The proxy: `/v1/<route>/...` to the service that owns it, as pure ASGI.

No FastAPI routing or dependency machinery on this path: per request it
parses the few headers it needs, admits the caller (`gateway.access`), signs
the principal, and streams the request and response bodies through the service's
keep-alive pool (`services.kit.pool`). Bodies up to `gateway_buffer_body_bytes` go in
one piece; larger ones, and any streamed response (SSE), pass through chunk by chunk.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.access import (
    PUBLIC_PATHS,
    check_scope,
    check_user,
    client_ip,
    is_money,
    is_signed_link,
    json_body,
)
from gateway.limits import declared_length, limit_for, refuse
from gateway.ratelimit import rate_headers
from services.kit.errors import (
    KuError,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from services.kit.logs import request_id_var
from services.kit.pool import Response
from services.kit.principal import ORIGIN_HEADER, PRINCIPAL_HEADER

PRINCIPAL = PRINCIPAL_HEADER.encode()
# A caller a service forwards to another (services.kit.principal): never a client's.
ORIGIN = ORIGIN_HEADER.encode()

log = logging.getLogger("ku.gateway.proxy")

# Never forwarded upstream: hop-by-hop headers, and the client's credentials and
# any identity it claims (services trust only the principal the gateway signs).
DROP_REQUEST = frozenset(
    {
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"expect",
        b"x-api-key",
        b"authorization",
        b"cookie",
        PRINCIPAL,
        ORIGIN,
        b"x-forwarded-for",
        b"x-request-id",
    }
)
DROP_RESPONSE = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"server",
        b"date",
        b"x-request-id",
        b"set-cookie",
    }
)
SMALL_RESPONSE = 256 * 1024
# The gateway's own routes under /v1/ (gateway.events).
OWN_PATHS = frozenset({"/v1/events", "/v1/events/tickets"})


def proxied(path: str) -> bool:
    """Whether the proxy answers `path` (rather than one of the gateway's own routes)."""
    return (path.startswith("/v1/") or path.startswith("/.well-known/")) and path not in OWN_PATHS


class _Route:
    """What the access log and metrics see as the route (one label per service)."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path


async def send_error(send: Send, exc: KuError, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = orjson.dumps(exc.body())
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    for name, value in (exc.headers() or {}).items():
        headers.append((name.lower().encode(), value.encode()))
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class ProxyMiddleware:
    def __init__(self, app: ASGIApp, gateway: Any) -> None:
        self.app = app
        self.gateway = gateway  # gateway.app.Gateway: settings, access, upstreams
        self._route_labels: dict[str, _Route] = {}
        # `settings.routes` merges two dicts on every access: once, here.
        self._routes: dict[str, str] = gateway.settings.routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not proxied(scope["path"]):
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a proxied request (the caller checked `proxied`): the gateway's front
        chain calls this directly (gateway.app)."""
        try:
            await self._proxy(scope, receive, send, scope["path"])
        except KuError as exc:
            await send_error(send, exc)

    def _label(self, name: str) -> _Route:
        label = self._route_labels.get(name)
        if label is None:
            label = self._route_labels[name] = _Route(f"/v1/{name}/*")
        return label

    async def _proxy(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        gw = self.gateway
        settings = gw.settings
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        headers: dict[bytes, bytes] = dict(raw)  # the last of a repeated header, as before
        forward = [header for header in raw if header[0] not in DROP_REQUEST]

        # The body limit first, as gateway.limits applies it to the other routes: a
        # declared length over the limit (or not a length) is refused before anything.
        max_body = limit_for(settings, path)
        length_header = headers.get(b"content-length")
        length = None if length_header is None else declared_length(length_header)
        if length is not None and (length > max_body or length < 0):
            await refuse(send, path, max_body)
            return
        chunked = headers.get(b"transfer-encoding") is not None

        if path.startswith("/.well-known/"):
            route, service = "auth", "auth"
        else:
            route = path[4:].split("/", 1)[0]
            owner = self._routes.get(route)
            if owner is None:
                raise NotFound("No such API", code="unknown_route")
            service = owner
        scope["route"] = self._label(route)

        query: str = scope["query_string"].decode("latin-1")
        method: str = scope["method"]
        ip = client_ip(scope, headers, settings)

        extra_headers: list[tuple[bytes, bytes]] = []
        principal_header: str | None = None
        body: bytes | None = None
        if path in PUBLIC_PATHS or is_signed_link(method, path, query):
            decision = await gw.access.admit_anonymous(ip)
        else:
            raw_key = headers.get(b"x-api-key")
            # Headers only: `?api_key=` is for the old clients' routes (gateway.access).
            api_key = raw_key.decode("latin-1") if raw_key is not None else None
            auth_header = headers.get(b"authorization")
            authorization = auth_header.decode("latin-1") if auth_header else None
            money = is_money(method, route)
            # The cached identity and local tokens when they suffice (no awaits), else
            # the full admission: the same checks either way (gateway.access).
            admitted = gw.access.admit_now(
                api_key=api_key, authorization=authorization, client_ip=ip, money=money
            )
            identity, decision = (
                admitted
                if admitted is not None
                else await gw.access.admit(
                    api_key=api_key, authorization=authorization, client_ip=ip, money=money
                )
            )
            principal = identity.principal
            check_scope(principal, route)
            if principal.kind == "user":
                parsed = None
                if length or chunked:
                    # Whatever the content type says: a service may read it as JSON.
                    body = await _read_body(receive, max_body)
                    parsed = json_body(body)
                check_user(principal, path, query, parsed)
            principal_header = identity.header_for(service)
        extra_headers = rate_headers(decision)

        if principal_header is not None:
            forward.append((PRINCIPAL, principal_header.encode()))
        request_id = request_id_var.get()
        if request_id:
            forward.append((b"x-request-id", request_id.encode("latin-1")))
        forward.append((b"x-forwarded-for", ip.encode("latin-1")))

        data: bytes | AsyncIterator[bytes] | None = body
        if body is None and (length or chunked):
            if length is not None and length <= settings.gateway_buffer_body_bytes:
                data = await _read_body(receive, max_body)
            else:
                data = _stream_body(receive, max_body)

        target: bytes = scope.get("raw_path") or path.encode()
        if query:
            target += b"?" + scope["query_string"]
        await self._forward(method, target, forward, data, send, receive, extra_headers, service)

    async def _forward(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        data: bytes | AsyncIterator[bytes] | None,
        send: Send,
        receive: Receive,
        extra_headers: list[tuple[bytes, bytes]],
        service: str,
    ) -> None:
        upstreams = self.gateway.upstreams
        started = False
        resp: Response | None = None
        try:
            resp = await upstreams.pools[service].request(
                method, target, headers, data, read_timeout=upstreams.read_timeout_for(service)
            )
            out = [(name, value) for name, value in resp.headers if name not in DROP_RESPONSE]
            out += extra_headers
            length = resp.content_length
            if resp.status >= 500 and not _is_json(resp):
                # A service's bare 5xx (a crash before its own handlers, a proxy in
                # between): the client still gets JSON, with a code.
                text = await resp.read(512)
                log.warning("upstream %s answered %s: %r", service, resp.status, text[:200])
                started = True
                error: KuError = (
                    ServiceUnavailable(
                        f"The {service} service is unavailable",
                        code="upstream_unavailable",
                        service=service,
                    )
                    if resp.status == 503
                    else UpstreamError(
                        f"The {service} service failed", service=service, status=resp.status
                    )
                )
                await send_error(send, error, extra_headers)
                return
            if length is not None and length <= SMALL_RESPONSE:
                payload = await resp.read()
                started = True
                await send({"type": "http.response.start", "status": resp.status, "headers": out})
                await send({"type": "http.response.body", "body": payload})
                return
            started = True
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
            await _pump(resp, send, receive)
        except _TooLarge:
            if started:
                raise
            await send_error(send, PayloadTooLarge("Request body too large"))
        except TimeoutError:
            if started:
                raise
            await send_error(
                send, UpstreamTimeout(f"The {service} service timed out", service=service)
            )
        except OSError as exc:  # refused, reset, closed early, not HTTP
            if started:
                raise
            log.warning("upstream %s failed: %r", service, exc)
            await send_error(
                send, UpstreamError(f"The {service} service is unreachable", service=service)
            )
        finally:
            if resp is not None:
                resp.release()  # back to the pool when the answer was read whole, else closed


def _is_json(resp: Response) -> bool:
    kind = (resp.header(b"content-type") or b"").decode("latin-1")
    kind = kind.split(";", 1)[0].strip().lower()
    return kind == "application/json" or kind.endswith("+json")


async def _pump(resp: Response, send: Send, receive: Receive) -> None:
    """Copy a streamed response, stopping as soon as the client goes away."""

    async def copy() -> None:
        async for chunk in resp.iter_chunks():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def watch() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    copier = asyncio.ensure_future(copy())
    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({copier, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (copier, watcher):
            if not task.done():
                task.cancel()
        await asyncio.gather(copier, watcher, return_exceptions=True)
    if copier.done() and not copier.cancelled() and copier.exception() is not None:
        raise copier.exception()  # type: ignore[misc]


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise UpstreamError("Client disconnected", code="client_disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge("Request body too large", limit=limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _stream_body(receive: Receive, limit: int) -> AsyncIterator[bytes]:
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge()
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return
