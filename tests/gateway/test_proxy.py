"""Routing and streaming: what the proxy forwards, and how upstream failures look."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import httpx
import orjson
import pytest

from services.kit.principal import verify_principal
from tests.gateway.conftest import Served, Stack


async def upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A stand-in service: echoes what it got, sleeps, or streams events slowly."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    path = scope["path"]
    for suffix, status in (("/crash", 500), ("/down", 503)):
        if path.endswith(suffix):  # what uvicorn or a proxy in between answers: plain text
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")],
                }
            )
            await send({"type": "http.response.body", "body": b"Internal Server Error"})
            return
    if path.endswith("/slow"):
        await asyncio.sleep(3)
    if path.endswith("/stream"):
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for i in range(3):
            await send(
                {"type": "http.response.body", "body": b"data: %d\n\n" % i, "more_body": True}
            )
            await asyncio.sleep(0.3)
        await send({"type": "http.response.body", "body": b""})
        return
    echo = orjson.dumps(
        {
            "path": path,
            "query": scope["query_string"].decode(),
            "size": len(body),
            "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
        }
    )
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": echo})


@pytest.fixture(scope="module")
async def proxied(stack: Stack) -> Any:
    from gateway.app import create_app

    async with Served(upstream) as fake:
        settings = stack.gateway_settings(
            generation_url=fake.url,
            gateway_upstream_timeout_seconds=1,
            gateway_generation_timeout_seconds=1,
            gateway_max_body_bytes=100_000,
            gateway_buffer_body_bytes=1000,
            cors_origins="https://penora.example",
        )
        async with Served(create_app(settings)) as gw:
            async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
                yield client


@pytest.fixture(scope="module")
async def generate_key(stack: Stack) -> str:
    from tests.gateway.helpers import create_key

    key, _ = await create_key(stack.auth, "penora", ["generate"])
    return key


class TestForwarding:
    async def test_principal_signed_credentials_stripped(
        self, proxied: httpx.AsyncClient, generate_key: str
    ):
        r = await proxied.get(
            "/v1/generation/echo",
            params={"x": "1"},
            headers={
                "X-API-Key": generate_key,
                "x-ku-principal": "forged",
                "X-Request-ID": "req-123",
            },
        )
        assert r.status_code == 200, r.text
        seen = r.json()
        assert seen["query"] == "x=1"
        assert "x-api-key" not in seen["headers"]
        principal = verify_principal(
            seen["headers"]["x-ku-principal"], audience="generation"
        ).principal
        assert principal.kind == "app" and principal.app == "penora"
        assert principal.scopes == {"generate", "users:any"}
        assert seen["headers"]["x-request-id"] == "req-123"
        assert r.headers["x-request-id"] == "req-123"
        assert int(r.headers["ratelimit-remaining"]) >= 0

    async def test_large_body_streams_and_too_large_is_413(
        self, proxied: httpx.AsyncClient, generate_key: str
    ):
        headers = {"X-API-Key": generate_key}
        r = await proxied.post("/v1/generation/echo", content=b"a" * 50_000, headers=headers)
        assert r.status_code == 200 and r.json()["size"] == 50_000
        r = await proxied.post("/v1/generation/echo", content=b"a" * 100_001, headers=headers)
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "payload_too_large"

        async def chunks():
            for _ in range(30):
                yield b"b" * 5000

        r = await proxied.post("/v1/generation/echo", content=chunks(), headers=headers)
        assert r.status_code == 413

    async def test_event_stream_passes_through_unbuffered(
        self, proxied: httpx.AsyncClient, generate_key: str
    ):
        start = time.monotonic()
        arrivals = []
        async with proxied.stream(
            "GET", "/v1/generation/stream", headers={"X-API-Key": generate_key}
        ) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    arrivals.append(time.monotonic() - start)
        assert len(arrivals) == 3
        assert arrivals[0] < 0.25  # the first event did not wait for the rest

    async def test_timeout_is_504_and_unknown_route_404(
        self, proxied: httpx.AsyncClient, generate_key: str
    ):
        headers = {"X-API-Key": generate_key}
        r = await proxied.get("/v1/generation/slow", headers=headers)
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "upstream_timeout"
        r = await proxied.get("/v1/nothing/here", headers=headers)
        assert r.status_code == 404

    async def test_a_bare_upstream_5xx_becomes_json(
        self, proxied: httpx.AsyncClient, generate_key: str
    ):
        headers = {"X-API-Key": generate_key}
        r = await proxied.get("/v1/generation/crash", headers=headers)
        assert r.status_code == 502 and r.headers["content-type"] == "application/json"
        error = r.json()["error"]
        assert error["code"] == "upstream_error" and error["detail"]["status"] == 500
        assert "x-request-id" in r.headers
        r = await proxied.get("/v1/generation/down", headers=headers)
        assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable"

    async def test_unreachable_service_is_502(self, gw: httpx.AsyncClient, stack: Stack):
        from tests.gateway.helpers import create_key

        key, _ = await create_key(stack.auth, "penora", ["workspace:read"])
        r = await gw.get("/v1/workspace/projects", headers={"X-API-Key": key})
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "upstream_error"

    async def test_cors_allow_list(self, proxied: httpx.AsyncClient):
        ok = await proxied.options(
            "/v1/ledger/balance",
            headers={"Origin": "https://penora.example", "Access-Control-Request-Method": "GET"},
        )
        assert ok.headers["access-control-allow-origin"] == "https://penora.example"
        assert ok.headers["access-control-allow-credentials"] == "true"
        bad = await proxied.options(
            "/v1/ledger/balance",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
        )
        assert "access-control-allow-origin" not in bad.headers


class TestMeta:
    async def test_startup_takes_its_objects_out_of_the_gc(self, gw: httpx.AsyncClient):
        import gc

        from gateway.app import GC_THRESHOLD

        assert (await gw.get("/health")).status_code == 200
        assert gc.get_freeze_count() > 10_000  # the modules, FastAPI, the app
        assert gc.get_threshold()[0] == GC_THRESHOLD

    async def test_health_ready_metrics(self, gw: httpx.AsyncClient):
        assert (await gw.get("/health")).json()["status"] == "ok"
        ready = await gw.get("/ready")
        assert ready.status_code == 200 and ready.json()["checks"]["redis"] == "ok"
        # Metrics are not on the public port...
        assert (await gw.get("/metrics")).status_code == 404

    async def test_metrics_on_their_own_port(self, stack: Stack):
        from gateway.app import create_app as create_gateway
        from services.kit.runner import free_port

        port = free_port()
        settings = stack.gateway_settings(gateway_metrics_port=port)
        async with Served(create_gateway(settings)) as gw2:
            async with httpx.AsyncClient() as client:
                await client.get(gw2.url + "/health")
                r = await client.get(f"http://127.0.0.1:{port}/metrics")
                assert r.status_code == 200 and "ku_http_requests_total" in r.text
                assert (await client.get(gw2.url + "/metrics")).status_code == 404

    async def test_merged_openapi(self, gw: httpx.AsyncClient):
        r = await gw.get("/openapi.json")
        assert r.status_code == 200
        doc = r.json()
        paths = doc["paths"]
        assert "/v1/ledger/debits" in paths and "/v1/users" in paths
        assert "/api/unified/deduct-credits" in paths and "/v1/events" in paths
        assert not any(p.startswith("/internal") for p in paths)
        schemes = doc["components"]["securitySchemes"]
        assert schemes["ApiKey"]["name"] == "X-API-Key" and schemes["Bearer"]["scheme"] == "bearer"
        assert schemes["ApiKeyQuery"]["in"] == "query"
        refs = orjson.dumps(doc).decode()
        for ref in set(re.findall(r'"#/components/schemas/([^"]+)"', refs)):
            assert ref in doc["components"]["schemas"], ref
        assert (await gw.get("/docs")).status_code == 200
