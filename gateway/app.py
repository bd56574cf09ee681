"""The gateway: Ku's only public door.

Request path, outermost first (all pure ASGI):
    RequestContextMiddleware  request id, access log, metrics (kit)
    BodyLimitMiddleware       every body bounded before it is read (gateway.limits)
    CORSMiddleware            allow-listed origins only (KU_CORS_ORIGINS)
    ProxyMiddleware           /v1/<route>/... -> the owning service (gateway.proxy)
    FastAPI routes            compat API, /v1/events, /openapi.json, /docs, /redoc, /static,
                              /console (gateway.console), health

A proxied request (`gateway.proxy.proxied`) takes its own chain, straight from the
app's `__call__` (`GatewayApp`): RequestContextMiddleware, CORS, then the proxy's
`handle`, which applies the body limit itself (the same functions of gateway.limits)
in its one pass over the headers. FastAPI's and Starlette's own layers (telemetry
checks, the exception middlewares, routing) do nothing for it and cost ~10% of a
proxied request's CPU. Everything else takes FastAPI's stack with the middlewares
above inside it.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from prometheus_client import start_http_server
from redis.asyncio import Redis
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import compat, console, events
from gateway.access import Access, authenticated
from gateway.auth import Authenticator
from gateway.config import GatewaySettings, get_settings
from gateway.limits import BodyLimitMiddleware
from gateway.openapi import MergedOpenAPI, add_docs_routes
from gateway.proxy import ProxyMiddleware, proxied
from gateway.ratelimit import RateLimiter
from gateway.upstream import Upstreams
from services.kit.bus import redis_from_url
from services.kit.errors import install_error_handlers
from services.kit.logs import configure_logging
from services.kit.middleware import RequestContextMiddleware


class Gateway:
    """Everything the gateway holds while it runs; built in the lifespan."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.upstreams = Upstreams(settings)
        self.redis: Redis | None = None
        self.limiter_redis: Redis | None = None
        self.authenticator: Authenticator
        self.access: Access
        self.hub: events.EventHub
        self.tickets: events.Tickets
        self.openapi: MergedOpenAPI
        self.metrics_server: Any = None

    async def start(self, app: FastAPI) -> None:
        s = self.settings
        if not s.redis_url:
            raise RuntimeError("KU_REDIS_URL must be set (`ku up` sets it for you)")
        self.redis = redis_from_url(s.redis_url)
        # Short timeouts: a dead Redis must not stall requests (reads fail open).
        self.limiter_redis = Redis.from_url(
            s.redis_url, socket_connect_timeout=0.5, socket_timeout=0.5
        )
        if s.gateway_metrics_port:
            # Metrics on their own (private) port, never on the public one.
            self.metrics_server, _ = start_http_server(
                s.gateway_metrics_port, addr=s.gateway_metrics_host
            )
        await self.upstreams.start()
        self.authenticator = Authenticator(s, self.upstreams)
        limiter = RateLimiter(self.limiter_redis, s.bus_prefix, s.gateway_rate_window_seconds)
        self.access = Access(s, self.authenticator, limiter)
        self.hub = events.EventHub(self.redis, s.bus_prefix, self.authenticator.revoke_prefix)
        self.hub.start()
        self.tickets = events.Tickets(self.redis, s.bus_prefix, s.gateway_events_ticket_seconds)
        self.openapi = MergedOpenAPI(self.upstreams, app.openapi)
        try:  # follow the streams from now on before taking traffic
            await asyncio.wait_for(self.hub.ready.wait(), timeout=3)
        except TimeoutError:
            pass
        quiet_gc()

    async def stop(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None
        await self.hub.stop()
        await self.upstreams.stop()
        for client in (self.redis, self.limiter_redis):
            if client is not None:
                await client.aclose()


# The cyclic collector's first generation threshold while serving (CPython's default: 700).
GC_THRESHOLD = 20_000


def quiet_gc() -> None:
    """Less of the cyclic garbage collector on the request path: everything built at
    startup (FastAPI, pydantic, the modules: ~150,000 objects) is frozen out of the
    collections (`gc.freeze`), and the first generation is collected after 20,000 net
    allocations instead of 700. A proxied request leaves no cyclic garbage (the
    protocol's used to: tests/kit/test_http.py), so what the collector would find is
    only the requests in flight. Before, it ran a young collection every ~20 requests
    and a full one (~60 ms) every few thousand, ~15% of the gateway's CPU under load
    (docs/ledger.md, "The gateway's added cost, cut again")."""
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, second, third)


class GatewayApp(FastAPI):
    """FastAPI, with proxied requests sent straight into the gateway's middleware chain."""

    front: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.front is not None and scope["type"] == "http" and proxied(scope["path"]):
            await self.front(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _middlewares(app: ASGIApp, gateway: Gateway, settings: GatewaySettings) -> ASGIApp:
    """The gateway's middleware chain around `app` (outermost last in this code)."""
    chain: ASGIApp = _cors(ProxyMiddleware(app, gateway=gateway), settings)
    chain = BodyLimitMiddleware(chain, settings=settings)
    return RequestContextMiddleware(chain, service="gateway", check_url=False, retry=False)


def _front(app: ASGIApp, gateway: Gateway, settings: GatewaySettings) -> ASGIApp:
    """The chain a proxied request takes: the same request context and CORS, then the
    proxy itself (`ProxyMiddleware.handle`, which applies the body limit in its own pass
    over the headers: gateway.limits), with no layer that would only pass it on."""
    chain = _cors(ProxyMiddleware(app, gateway=gateway).handle, settings)
    return RequestContextMiddleware(chain, service="gateway", check_url=False, retry=False)


def _cors(chain: ASGIApp, settings: GatewaySettings) -> ASGIApp:
    origins = settings.cors_origin_list
    if not origins:
        return chain
    return CORSMiddleware(
        chain,
        allow_origins=origins,
        allow_credentials=True,
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
        allow_headers=[
            "Authorization",
            "Content-Type",
            "X-API-Key",
            "Idempotency-Key",
            "Last-Event-ID",
            "X-Request-ID",
        ],
        expose_headers=[
            "X-Request-ID",
            "Retry-After",
            "RateLimit-Limit",
            "RateLimit-Remaining",
            "RateLimit-Reset",
            "Idempotent-Replayed",
        ],
        max_age=600,
    )


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or get_settings()
    gateway = Gateway(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging("gateway", settings.log_level, settings.log_json)
        settings.require_principal_keys("gateway")
        await gateway.start(app)
        try:
            yield
        finally:
            await gateway.stop()

    app = GatewayApp(
        title="Ku API",
        version="1.0.0",
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        # Metrics are Prometheus (kit.metrics); FastAPI's OpenTelemetry hooks would
        # otherwise look up tracer providers on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.service_name = "gateway"
    app.state.gateway = gateway
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(compat.build_router())
    app.include_router(events.build_router(authenticated))
    app.include_router(console.build_router())
    _add_meta_routes(app, gateway)

    # The chain inside FastAPI's stack for the gateway's own routes, and the proxied
    # requests' chain in front of it (GatewayApp).
    app.add_middleware(_Chain, gateway=gateway, settings=settings)
    app.front = _front(FastAPI.__call__.__get__(app), gateway, settings)
    return app


class _Chain:
    """`_middlewares` as one Starlette middleware (app.add_middleware builds it lazily)."""

    def __init__(self, app: ASGIApp, gateway: Gateway, settings: GatewaySettings) -> None:
        self.app = _middlewares(app, gateway, settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def _add_meta_routes(app: FastAPI, gateway: Gateway) -> None:
    @app.get("/health", include_in_schema=False)
    async def health() -> dict[str, str]:
        return {"status": "ok", "service": "gateway"}

    @app.get("/ready", include_in_schema=False)
    async def ready() -> JSONResponse:
        checks: dict[str, str] = {}
        try:
            async with asyncio.timeout(2):
                await gateway.redis.ping()  # type: ignore[union-attr]
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"error: {type(exc).__name__}"
        ok = checks["redis"] == "ok"
        # The services are reported, not required: each has its own readiness.
        for name in ("auth", "ledger", "workspace"):
            try:
                status, _ = await gateway.upstreams.call(
                    name, "GET", "/health", principal=None, timeout_seconds=1
                )
                checks[name] = "ok" if status == 200 else f"error: {status}"
            except Exception as exc:
                checks[name] = f"error: {type(exc).__name__}"
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "checks": checks},
            status_code=200 if ok else 503,
        )

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> Any:
        return JSONResponse(await gateway.openapi.document())

    add_docs_routes(app)
