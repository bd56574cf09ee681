"""Audit: a user token names another user in no spelling the services read.

The gateway's first line (`gateway.access.check_user`) must read a request's user ids
the way the services behind it read them: Starlette's query parsing (percent-decoded
names) and FastAPI's JSON body (parsed whatever the content type says, `\\u` escapes
decoded, UTF-16 and a BOM accepted). An echo upstream stands for the service: a request
that reaches it got past the gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest

from tests.gateway.conftest import Served, Stack
from tests.gateway.helpers import new_user_id


class Echo:
    """An upstream that answers 200 with what it got, and keeps each request."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen = {
            "reached": True,
            "path": scope["path"],
            "query": scope["query_string"].decode("latin-1"),
            "headers": sorted({k.decode("latin-1") for k, _ in scope["headers"]}),
            "body": body.decode("latin-1"),
        }
        self.seen.append(seen)
        answer = orjson.dumps(seen)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": answer})


@asynccontextmanager
async def gateway_before(stack: Stack, service: str, upstream: Echo) -> AsyncIterator[str]:
    """A gateway whose `service` is `upstream` (auth and the ledger are the stack's)."""
    from gateway.app import create_app
    from gateway.config import GatewaySettings

    async with Served(upstream) as served:
        urls: dict[str, Any] = {"workspace_url": "http://127.0.0.1:9", f"{service}_url": served.url}
        settings = GatewaySettings(
            auth_url=stack.auth_url,
            ledger_url=stack.ledger_url,
            gateway_metrics_port=0,
            gateway_rate_per_ip=100_000,
            **urls,
        )
        async with Served(create_app(settings)) as gw:
            yield gw.url


@pytest.fixture
async def front(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_before(stack, "workspace", Echo()) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            yield client


VICTIM = new_user_id()
QUERIES = {
    "plain": "user_id=" + VICTIM,
    "percent-encoded name": "user%5Fid=" + VICTIM,
    "percent-encoded name, upper": "%75ser_id=" + VICTIM,
    "own then another": "user_id={me}&user%5Fid=" + VICTIM,
}
JSON = "application/json"
BODIES: dict[str, tuple[bytes, list[tuple[str, str]]]] = {
    "plain": (b'{"user_id": "%s"}' % VICTIM.encode(), [("content-type", JSON)]),
    "escaped name": (b'{"user\\u005fid": "%s"}' % VICTIM.encode(), [("content-type", JSON)]),
    "no content type": (b'{"user_id": "%s"}' % VICTIM.encode(), []),
    "upper-case content type": (
        b'{"user_id": "%s"}' % VICTIM.encode(),
        [("content-type", "Application/JSON")],
    ),
    "json first, text last": (
        b'{"user_id": "%s"}' % VICTIM.encode(),
        [("content-type", JSON), ("content-type", "text/plain")],
    ),
    "utf-16": (f'{{"user_id": "{VICTIM}"}}'.encode("utf-16"), [("content-type", JSON)]),
    "bom": (b'\xef\xbb\xbf{"user_id": "%s"}' % VICTIM.encode(), [("content-type", JSON)]),
    "NaN elsewhere": (b'{"x": NaN, "user_id": "%s"}' % VICTIM.encode(), [("content-type", JSON)]),
    "number": (b'{"user_id": %s}' % VICTIM.encode(), [("content-type", JSON)]),
}


@pytest.mark.parametrize("name", QUERIES)
async def test_query_naming_another_user_is_403(
    front: httpx.AsyncClient, stack: Stack, name: str
) -> None:
    me = new_user_id()
    auth = {"Authorization": f"Bearer {stack.signing.token(me)}"}
    query = QUERIES[name].format(me=me)
    r = await front.get(f"/v1/workspace/projects?{query}", headers=auth)
    assert r.status_code == 403, (name, r.text)
    assert r.json()["error"]["code"] == "wrong_user"
    # The user's own id in any spelling still passes.
    r = await front.get(f"/v1/workspace/projects?user%5Fid={me}", headers=auth)
    assert r.status_code == 200 and r.json()["reached"]


@pytest.mark.parametrize("name", BODIES)
async def test_body_naming_another_user_is_403(
    front: httpx.AsyncClient, stack: Stack, name: str
) -> None:
    me = new_user_id()
    body, headers = BODIES[name]
    headers = [*headers, ("authorization", f"Bearer {stack.signing.token(me)}")]
    r = await front.post("/v1/workspace/projects", content=body, headers=headers)
    assert r.status_code == 403, (name, r.text)
    assert r.json()["error"]["code"] == "wrong_user"


async def test_own_user_and_non_json_bodies_pass(front: httpx.AsyncClient, stack: Stack) -> None:
    me = new_user_id()
    auth = {"Authorization": f"Bearer {stack.signing.token(me)}"}
    for body in (b'{"user_id": "%s"}' % me.encode(), b"not json", b"[1, 2]", b"{}"):
        r = await front.post("/v1/workspace/projects", content=body, headers=auth)
        assert r.status_code == 200 and r.json()["body"] == body.decode(), body
