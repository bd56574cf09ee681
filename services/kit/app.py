"""The app factory every service uses: settings, logging, middleware, errors,
health, metrics, database engine, Redis and the outbox relay, in one place."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI

from services.kit import health, metrics
from services.kit.bus import redis_from_url
from services.kit.config import KuSettings
from services.kit.db import create_engine, plain_url, sessionmaker_for
from services.kit.errors import install_error_handlers
from services.kit.front import FrontApp
from services.kit.logs import configure_logging
from services.kit.middleware import RequestContextMiddleware
from services.kit.outbox import OutboxRelay, stream_name

Hook = Callable[[FastAPI], AbstractAsyncContextManager[Any]]


def create_service_app(
    *,
    name: str,
    settings: KuSettings,
    routers: Sequence[APIRouter],
    title: str,
    description: str,
    outbox_schema: str | None = None,
    hooks: Sequence[Hook] = (),
    openapi_tags: list[dict[str, Any]] | None = None,
    app_class: type[FastAPI] = FastAPI,
) -> FastAPI:
    """Build a service. `outbox_schema` starts a relay for `<schema>.outbox`;
    `hooks` are extra async context managers run inside the lifespan; `app_class` a
    FastAPI subclass (`services.kit.front.FrontApp` answers the routers' hot routes
    before FastAPI's layers)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(name, settings.log_level, settings.log_json)
        if not settings.database_url or not settings.redis_url:
            raise RuntimeError(
                "KU_DATABASE_URL and KU_REDIS_URL must be set (`ku up` sets them for you)"
            )
        settings.require_principal_keys(name)
        engine = create_engine(settings)
        redis = redis_from_url(settings.redis_url)
        app.state.settings = settings
        app.state.engine = engine
        app.state.sessionmaker = sessionmaker_for(engine)
        app.state.redis = redis
        relay = None
        if outbox_schema:
            relay = OutboxRelay(
                plain_url(settings.database_url),
                redis,
                outbox_schema,
                stream_name(settings.bus_prefix, name),
                issuer=name,
            )
            relay.start()
        app.state.outbox_relay = relay
        try:
            async with _run_hooks(app, hooks):
                # Built now, not on the first GET /openapi.json: it takes about a second
                # (every request model's schema), longer than the gateway waits for it
                # when it merges the services' documents on a busy machine.
                app.openapi()
                # Everything built at startup lives as long as the process: move it out
                # of the collector's reach so full collections stay short (p99 latency).
                gc.collect()
                gc.freeze()
                yield
        finally:
            if relay is not None:
                await relay.stop()
            await redis.aclose()
            await engine.dispose()

    app = app_class(
        title=title,
        description=description,
        version="1.0.0",
        lifespan=lifespan,
        openapi_tags=openapi_tags,
        # Metrics are Prometheus (kit.metrics); FastAPI's OpenTelemetry hooks would
        # otherwise look up tracer providers on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.service_name = name
    install_error_handlers(app)
    # The service's own routes first: routing tries routes in order, and these are hot.
    for router in routers:
        app.include_router(router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.add_middleware(RequestContextMiddleware, service=name)
    if isinstance(app, FrontApp):
        app.setup_front(routers)
    return app


@asynccontextmanager
async def _run_hooks(app: FastAPI, hooks: Sequence[Hook]) -> AsyncIterator[None]:
    if not hooks:
        yield
        return
    async with hooks[0](app):
        async with _run_hooks(app, hooks[1:]):
            yield
