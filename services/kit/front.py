"""Hot routes, answered in front of FastAPI's layers.

FastAPI's stack (its middlewares, the routers' matching through included routers, the
per-request dependency solve, the request/response wrappers) costs a service's busiest
routes a noticeable share of their CPU and does nothing their well-formed requests need
(docs/ledger.md "The hot path"). A service marks such a route:

    router = APIRouter(prefix="/v1/ledger", route_class=HotRoute)

    @router.post("/debits", ...)
    @hot(DebitCreate)                       # or @hot_query(user_id=UserId) for a GET
    async def create_debit(body: DebitCreate, request: Request, principal: ...) -> Response:

and builds its app with `create_service_app(..., app_class=FrontApp)`. `HotRoute.fast`
answers a well-formed request without the dependency solve: the JSON body is parsed
(orjson) and validated by the same model in the same (python) mode, the principal is
the same `get_principal`, each other argument named in `hot(..., name=resolver)` is
`resolver(request)`, then the endpoint runs. Anything off that path (another content
type, a body that does not parse or validate) makes `fast` answer None, and FastAPI's
own handler answers exactly as before: the 4xx bodies and their order (JSON errors, then
the principal, then validation) are FastAPI's. Inside FastAPI's stack, a request its
OpenTelemetry tracing covers is FastAPI's too (in front of the stack it never is). The
route, its signature and the OpenAPI are unchanged.

`FrontApp` calls `fast` before any of FastAPI's layers: a request for a hot route goes
through the kit's RequestContextMiddleware (request id, logs, metrics, errors) straight
to `fast`; when that declines, the request, its body replayed, goes through FastAPI's
whole stack as any other route's does. Exceptions the endpoint raises are answered by
the app's own handlers.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.routing import APIRoute
from fastapi.telemetry import get_telemetry_data
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.types import Message, Receive, Scope, Send

from services.kit.middleware import RequestContextMiddleware, replaying
from services.kit.principal import get_principal

Fast = Callable[[Request], Awaitable[Response | None]]
Resolver = Callable[[Request], Any]

# A hot request's body is read in front of FastAPI up to this size; a larger one (a big
# batch) takes FastAPI's path.
FRONT_BODY_LIMIT = 256 * 1024


class HotRoute(APIRoute):
    """A route whose endpoint is marked `@hot(Model)` (or `@hot_query`) has a fast path,
    `fast` (module docstring); other routes of the router are plain `APIRoute`s."""

    fast: Fast | None = None

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        fast = self.fast = _fast_path(self.endpoint)
        if fast is None:
            return handler

        async def app(request: Request) -> Response:
            # Inside FastAPI's stack its telemetry may be on for this request: then
            # FastAPI answers (its spans). In front of the stack (FrontApp) it never is.
            response = await fast(request) if get_telemetry_data() is None else None
            return response if response is not None else await handler(request)

        return app


def _fast_path(endpoint: Callable[..., Any]) -> Fast | None:
    resolvers: dict[str, Resolver] = getattr(endpoint, "_ku_hot_resolvers", {})
    query: dict[str, TypeAdapter[Any]] | None = getattr(endpoint, "_ku_hot_query", None)
    if query is not None:
        return _query_fast_path(endpoint, query, resolvers)
    hot_body: tuple[type[BaseModel], bool] | None = getattr(endpoint, "_ku_hot_body", None)
    if hot_body is None:
        return None
    model, optional = hot_body

    async def fast(request: Request) -> Response | None:
        if request.headers.get("content-type") != "application/json":
            return None
        raw = await request.body()
        if not raw and not optional:
            return None
        try:
            body = model.model_validate(orjson.loads(raw)) if raw else None
        except (orjson.JSONDecodeError, ValidationError):
            return None
        principal = await get_principal(request)
        extra = {name: resolve(request) for name, resolve in resolvers.items()}
        response: Response = await endpoint(
            body=body, request=request, principal=principal, **request.path_params, **extra
        )
        return response

    return fast


def _query_fast_path(
    endpoint: Callable[..., Any], query: dict[str, TypeAdapter[Any]], resolvers: dict[str, Resolver]
) -> Fast:
    """A GET route's fast path: each query parameter read as FastAPI reads it (the last
    value) and validated by its own type; a missing or invalid one goes to FastAPI."""

    async def fast(request: Request) -> Response | None:
        params = _query_last_values(request.scope["query_string"])
        values: dict[str, Any] = {}
        for name, adapter in query.items():
            value = params.get(name)
            if value is None:
                return None
            try:
                values[name] = adapter.validate_python(value)
            except ValidationError:
                return None
        principal = await get_principal(request)
        extra = {name: resolve(request) for name, resolve in resolvers.items()}
        response: Response = await endpoint(request=request, principal=principal, **values, **extra)
        return response

    return fast


def _query_last_values(query_string: bytes) -> dict[str, str]:
    """Each query parameter's last value, as Starlette's `request.query_params.get`
    reads it (the same `parse_qsl` of the same latin-1 text), without building its
    multi-dict: what a hot query route reads."""
    return dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))


_F = TypeVar("_F", bound=Callable[..., Any])


def hot(
    model: type[BaseModel], *, optional: bool = False, **resolvers: Resolver
) -> Callable[[_F], _F]:
    """Mark a route for `HotRoute`'s fast path: its body is `model` (or None when
    `optional` and the body is empty); its other arguments are `request`, `principal`,
    its path parameters (plain strings) and one per `resolvers` entry, `resolver(request)`
    (what the route's FastAPI dependency of that name gives, without the solve)."""

    def mark(endpoint: _F) -> _F:
        endpoint._ku_hot_body = (model, optional)  # type: ignore[attr-defined]
        endpoint._ku_hot_resolvers = resolvers  # type: ignore[attr-defined]
        return endpoint

    return mark


def hot_query(**params: Any) -> Callable[[_F], _F]:
    """Mark a GET route for `HotRoute`'s fast path: its required query parameters and
    their types; its other arguments are `request` and `principal`."""

    def mark(endpoint: _F) -> _F:
        adapters = {name: TypeAdapter(kind) for name, kind in params.items()}
        endpoint._ku_hot_query = adapters  # type: ignore[attr-defined]
        return endpoint

    return mark


class FrontApp(FastAPI):
    """FastAPI, with the hot routes' well-formed requests answered in front of its
    layers (module docstring). `create_service_app` calls `setup_front(routers)` with
    the routers it included (as they are: with their own prefixes, none added)."""

    def setup_front(self, routers: Sequence[APIRouter]) -> None:
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
        self._front = RequestContextMiddleware(self._answer, service=self.state.service_name)

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
        scope["path_params"] = (
            {name: route.param_convertors[name].convert(value) for name, value in params.items()}
            if params
            else {}
        )
        request = Request(scope, replay)
        # The body is read already: `request.body()` answers it without a receive
        # (Starlette keeps a read body in `_body`; FastAPI's path reads it the same way).
        request._body = body
        fast: Fast = route.fast
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
