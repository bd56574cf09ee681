"""The ledger service: balances, grants, debits, holds, refunds and the journal."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from fastapi import FastAPI, Request, Response
from starlette.types import Message, Receive, Scope, Send

from services.kit.app import create_service_app
from services.kit.db import plain_url
from services.kit.middleware import RequestContextMiddleware, replaying
from services.ledger.api import routers
from services.ledger.batcher import GroupCommitter
from services.ledger.config import get_settings
from services.ledger.endpoints import HotRoute
from services.ledger.models import SCHEMA
from services.ledger.service import Ledger
from services.ledger.tasks import consume_user_created

DESCRIPTION = """
Ku's ledger: one balance of Ku coins per user, shared by every app.

Amounts are Ku as JSON numbers with at most 3 decimals. Every POST takes an
`Idempotency-Key` header (or a natural `reference`): a retry replays the first
result, the same key with a different request is 409.
"""


async def _keep_session(conn: asyncpg.Connection) -> None:
    return None


@asynccontextmanager
async def ledger_writer(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    pool = await asyncpg.create_pool(
        plain_url(settings.database_url),
        min_size=2,
        max_size=settings.write_pool_size,
        # Writers only run single autocommit statements: no session state to reset,
        # so skip the RESET ALL round trip on every release.
        reset=_keep_session,
    )
    app.state.write_pool = pool
    app.state.ledger = Ledger(
        GroupCommitter(
            pool, max_ops=settings.batch_max_ops, max_inflight=settings.batch_max_inflight
        )
    )
    try:
        yield
    finally:
        await pool.close()


# A hot request's body is read in front of FastAPI up to this size; a larger one (a big
# batch) takes FastAPI's path.
FRONT_BODY_LIMIT = 256 * 1024


class LedgerApp(FastAPI):
    """FastAPI, with the hot routes' well-formed requests answered in front of its
    layers.

    FastAPI's stack (its middlewares, the routers' matching through included routers,
    the request/response wrappers) costs about a sixth of a single debit's CPU in the
    ledger and does nothing a hot route's fast path needs (docs/ledger.md "The hot
    path"). A request for one of those routes goes through the kit's
    RequestContextMiddleware (request id, logs, metrics, errors) straight to the route's
    `fast` function; when that declines (another content type, a body that does not
    parse or validate: see `HotRoute`), the request, its body replayed, goes through
    FastAPI's whole stack as any other route's does, so every error body stays
    FastAPI's. Exceptions the endpoint raises are answered by the app's own handlers."""

    def setup_front(self) -> None:
        self._exact: dict[tuple[str, str], HotRoute] = {}
        self._patterns: list[tuple[str, re.Pattern[str], HotRoute]] = []
        for router in routers:
            for route in router.routes:
                if not isinstance(route, HotRoute) or route.fast is None:
                    continue
                for method in route.methods or ():
                    if route.param_convertors:
                        self._patterns.append((method, route.path_regex, route))
                    else:
                        self._exact[(method, route.path)] = route
        self._front = RequestContextMiddleware(self._answer, service="ledger")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            route = self._exact.get((scope["method"], scope["path"]))
            params: dict[str, Any] = {}
            if route is None:
                for method, pattern, candidate in self._patterns:
                    match = pattern.match(scope["path"])
                    if match is not None and method == scope["method"]:
                        route, params = candidate, match.groupdict()
                        break
            if route is not None:
                scope["ku.hot"] = (route, params)
                await self._front(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        route, params = scope["ku.hot"]
        read, body = await _read_body(receive, FRONT_BODY_LIMIT)
        if body is None:  # too large, or the client left: FastAPI's path, as received
            await super().__call__(scope, replaying(read, receive), send)
            return
        replay = replaying(read, receive)
        scope["app"] = self
        scope["route"] = route
        scope["path_params"] = {
            name: route.param_convertors[name].convert(value) for name, value in params.items()
        }
        request = Request(scope, replay)
        fast: Callable[[Request], Awaitable[Response | None]] = route.fast
        try:
            response = await fast(request)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                raise  # the kit middleware's JSON 500
            response = await handler(request, exc)
        if response is None:
            await super().__call__(scope, replaying(read, receive), send)
            return
        await response(scope, replay, send)

    def _handler_for(self, exc: Exception) -> Any:
        for kind in type(exc).__mro__:
            handler = self.exception_handlers.get(kind)
            if handler is not None:
                return handler
        return None


async def _read_body(receive: Receive, limit: int) -> tuple[list[Message], bytes | None]:
    """The request's messages read so far, and its whole body, or None when it is
    larger than `limit` or the client left (the messages then go on to FastAPI)."""
    read: list[Message] = []
    size = 0
    while True:
        message = await receive()
        read.append(message)
        if message["type"] != "http.request":
            return read, None
        size += len(message.get("body", b""))
        if size > limit:
            return read, None
        if not message.get("more_body", False):
            return read, b"".join(m.get("body", b"") for m in read)


def create_app() -> FastAPI:
    settings = get_settings()
    app = create_service_app(
        name="ledger",
        settings=settings,
        routers=routers,
        title="Ku Ledger",
        description=DESCRIPTION,
        outbox_schema=SCHEMA,
        hooks=[ledger_writer, consume_user_created],
        app_class=LedgerApp,
    )
    assert isinstance(app, LedgerApp)
    app.setup_front()
    return app
