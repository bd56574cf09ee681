"""services/kit/front.py: hot routes answered in front of FastAPI's layers, with the same
answers as FastAPI's own path (the ledger's hot routes: tests/ledger/test_debits.py
TestHotPath; generation's chat/completions: below and tests/generation/test_openai.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field
from starlette.responses import StreamingResponse

from services.kit.app import create_service_app
from services.kit.config import KuSettings
from services.kit.errors import PaymentRequired
from services.kit.front import FrontApp, HotRoute, hot
from services.kit.principal import Principal, get_principal
from services.kit.testing.plugin import principal_headers

SERVICE = "generation"  # any service name: the principal header is addressed to it


class Order(BaseModel):
    item: str = Field(min_length=1)
    count: int = Field(ge=1)
    stream: bool = False


class Shop:
    def __init__(self) -> None:
        self.resolved = 0  # by the fast path's resolver
        self.solved = 0  # by FastAPI's dependency


def resolved_shop(request: Request) -> Shop:
    shop: Shop = request.app.state.shop
    shop.resolved += 1
    return shop


async def solved_shop(request: Request) -> Shop:
    shop: Shop = request.app.state.shop
    shop.solved += 1
    return shop


def build() -> tuple[FrontApp, Shop]:
    router = APIRouter(prefix="/v1/shop", route_class=HotRoute)

    @router.post("/orders")
    @hot(Order, shop=resolved_shop)
    async def order(
        body: Order,
        request: Request,
        principal: Annotated[Principal, Depends(get_principal)],
        shop: Annotated[Shop, Depends(solved_shop)],
    ) -> Any:
        if body.count > 10:
            raise PaymentRequired("Too many", code="insufficient_credits")
        if body.stream:

            async def chunks() -> AsyncIterator[bytes]:
                for i in range(body.count):
                    yield b"data: %d\n\n" % i

            return StreamingResponse(chunks(), media_type="text/event-stream")
        return Response(
            b'{"item":"%s","count":%d,"by":"%s"}'
            % (body.item.encode(), body.count, str(principal.app).encode()),
            media_type="application/json",
        )

    @router.post("/plain")
    async def plain(body: Order) -> dict[str, Any]:
        return {"plain": body.item}

    app = create_service_app(
        name=SERVICE,
        settings=KuSettings(),
        routers=[router],
        title="shop",
        description="front path test app",
        app_class=FrontApp,
    )
    assert isinstance(app, FrontApp)
    app.state.shop = Shop()
    return app, app.state.shop


@pytest.fixture
async def shop() -> AsyncIterator[tuple[httpx.AsyncClient, Shop]]:
    app, state = build()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://shop"
    ) as client:
        yield client, state


def headers(content_type: str = "application/json") -> dict[str, str]:
    return {**principal_headers(audience=SERVICE), "content-type": content_type}


class TestFrontApp:
    async def test_well_formed_request_takes_the_fast_path(self, shop) -> None:
        client, state = shop
        r = await client.post(
            "/v1/shop/orders", content=b'{"item":"a","count":2}', headers=headers()
        )
        assert r.status_code == 200, r.text
        assert r.json() == {"item": "a", "count": 2, "by": "penora"}
        assert r.headers["x-request-id"]
        assert (state.resolved, state.solved) == (1, 0)

    async def test_declined_request_is_fastapis_with_the_same_answer(self, shop) -> None:
        client, state = shop
        body = b'{"item":"a","count":2}'
        fast = await client.post("/v1/shop/orders", content=body, headers=headers())
        slow = await client.post(
            "/v1/shop/orders", content=body, headers=headers("application/json; charset=utf-8")
        )
        assert slow.status_code == fast.status_code == 200, slow.text
        assert slow.json() == fast.json()
        assert (state.resolved, state.solved) == (1, 1)

    async def test_invalid_bodies_get_fastapis_errors_in_fastapis_order(self, shop) -> None:
        client, state = shop
        bad_json = await client.post("/v1/shop/orders", content=b"{nope", headers=headers())
        assert bad_json.status_code == 400, bad_json.text
        assert bad_json.json()["error"]["code"] == "malformed_json"
        invalid = await client.post(
            "/v1/shop/orders", content=b'{"item":"","count":0}', headers=headers()
        )
        assert invalid.status_code == 422
        assert invalid.json()["error"]["code"] == "validation_error"
        # No principal: 401 from the same dependency on either path.
        anonymous = await client.post(
            "/v1/shop/orders",
            content=b'{"item":"a","count":1}',
            headers={"content-type": "application/json"},
        )
        assert anonymous.status_code == 401
        assert anonymous.json()["error"]["code"] == "missing_principal"
        assert state.resolved == 0

    async def test_the_endpoints_errors_are_the_apps_error_bodies(self, shop) -> None:
        client, state = shop
        r = await client.post(
            "/v1/shop/orders", content=b'{"item":"a","count":11}', headers=headers()
        )
        assert r.status_code == 402
        assert r.json()["error"]["code"] == "insufficient_credits"
        assert state.resolved == 1

    async def test_streamed_answers_go_out_from_the_front(self, shop) -> None:
        client, state = shop
        r = await client.post(
            "/v1/shop/orders", content=b'{"item":"a","count":3,"stream":true}', headers=headers()
        )
        assert r.status_code == 200
        assert r.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
        assert state.resolved == 1

    async def test_unmarked_routes_and_other_methods_are_fastapis(self, shop) -> None:
        client, state = shop
        r = await client.post(
            "/v1/shop/plain", content=b'{"item":"b","count":1}', headers=headers()
        )
        assert r.json() == {"plain": "b"}
        assert (await client.get("/v1/shop/orders")).status_code == 405
        assert (state.resolved, state.solved) == (0, 0)


def test_generation_answers_chat_completions_in_front() -> None:
    """The generation service's OpenAI-compatible completions (every streamed answer's
    first token waits for its request's path) are a hot route of a FrontApp."""
    from services.generation.api import routers
    from services.generation.app import create_app as create_generation
    from services.generation.openai_compat import ChatCompletionIn
    from services.generation.openai_compat import router as openai_router

    route = next(
        r
        for r in openai_router.routes
        if isinstance(r, HotRoute) and r.path == "/v1/generation/chat/completions"
    )
    assert route.fast is not None
    assert getattr(route.endpoint, "_ku_hot_body", None) == (ChatCompletionIn, False)
    assert openai_router in routers
    app = create_generation()
    assert isinstance(app, FrontApp)
    assert app._exact[("POST", "/v1/generation/chat/completions")] is route


@pytest.mark.parametrize(
    "query",
    [
        b"user_id=abc",
        b"user_id=a&user_id=b",
        b"user_id=&x=1",
        b"user_id",
        b"user_id=a%20b+c&user_id=%C3%A9",
        b"a=1;user_id=2",
        b"user_id=%00&",
        b"",
        b"user_id=\xe9",
    ],
)
def test_a_hot_query_reads_each_parameter_as_starlette_does(query: bytes) -> None:
    """The hot query path reads the query string itself (no multi-dict): the same last
    value per name as `request.query_params.get` on FastAPI's path."""
    from starlette.datastructures import QueryParams

    from services.kit.front import _query_last_values

    params = QueryParams(query)
    ours = _query_last_values(query)
    assert set(ours) == set(params.keys())
    assert {name: params.get(name) for name in params} == ours
