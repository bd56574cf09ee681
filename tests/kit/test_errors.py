"""The kit's last line: whatever a route does, the client gets JSON with the request id."""

from __future__ import annotations

import os

import asyncpg
import httpx
import pytest
from fastapi import FastAPI, Request
from sqlalchemy import exc

from services.kit.db import is_disconnect
from services.kit.errors import install_error_handlers
from services.kit.middleware import RequestContextMiddleware, new_request_id


def make_app(check_url: bool = True) -> tuple[FastAPI, list[str]]:
    app = FastAPI()
    install_error_handlers(app)
    calls: list[str] = []

    @app.get("/boom")
    async def boom() -> dict[str, str]:
        raise RuntimeError("a bug")

    @app.api_route("/flaky", methods=["GET", "POST"])
    async def flaky(request: Request) -> dict[str, str]:
        body = await request.body()
        calls.append(body.decode())
        if len(calls) % 2 == 1:  # the first attempt loses its connection
            raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle")
        return {"ok": body.decode()}

    @app.get("/echo")
    async def echo(q: str = "") -> dict[str, str]:
        return {"q": q}

    app.add_middleware(RequestContextMiddleware, service="test", check_url=check_url)
    return app, calls


def client(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


class TestLastLine:
    async def test_an_unhandled_exception_is_a_json_500_with_the_request_id(self) -> None:
        app, _ = make_app()
        async with client(app) as c:
            r = await c.get("/boom", headers={"x-request-id": "req-123"})
        assert r.status_code == 500 and r.headers["content-type"] == "application/json"
        assert r.json() == {
            "error": {
                "code": "internal_error",
                "message": "Internal server error",
                "detail": {"request_id": "req-123"},
            }
        }
        assert r.headers["x-request-id"] == "req-123"

    async def test_a_lost_connection_is_retried_once_when_safe(self) -> None:
        app, calls = make_app()
        async with client(app) as c:
            r = await c.get("/flaky")
            assert r.status_code == 200, r.text
            assert len(calls) == 2
            r = await c.post("/flaky", content=b"payload", headers={"Idempotency-Key": "k1"})
            assert r.status_code == 200 and r.json() == {"ok": "payload"}
            assert calls[-2:] == ["payload", "payload"]  # the body was replayed

    async def test_an_unsafe_request_is_not_retried_but_gets_a_json_503(self) -> None:
        app, calls = make_app()
        async with client(app) as c:
            r = await c.post("/flaky", content=b"once")
        assert calls == ["once"]
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "database_unavailable"

    @pytest.mark.parametrize("url", ["/echo?q=a%00b", "/echo%00", "/ech%00o?q=1"])
    async def test_a_nul_in_the_url_is_a_422(self, url: str) -> None:
        app, _ = make_app()
        async with client(app) as c:
            r = await c.get(url)
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_text"
            assert (await c.get("/echo?q=caf%C3%A9")).json() == {"q": "café"}

    async def test_the_gateway_leaves_urls_to_its_routes(self) -> None:
        app, _ = make_app(check_url=False)
        async with client(app) as c:
            r = await c.get("/echo?q=a%00b")
        assert r.status_code == 200  # `q: str` here is unguarded on purpose


class TestIsDisconnect:
    def test_recognises_lost_connections_through_wrappers(self) -> None:
        lost = asyncpg.ConnectionDoesNotExistError("closed")
        wrapped = exc.DBAPIError("SELECT 1", {}, lost)
        assert is_disconnect(lost) and is_disconnect(wrapped)
        assert is_disconnect(asyncpg.exceptions.AdminShutdownError("terminated"))
        assert is_disconnect(ConnectionResetError())

    def test_a_bad_query_is_not_a_disconnect(self) -> None:
        assert not is_disconnect(asyncpg.exceptions.UniqueViolationError("dup"))
        assert not is_disconnect(exc.DBAPIError("x", {}, ValueError("bad")))
        assert not is_disconnect(RuntimeError("bug"))


class TestRequestIds:
    async def test_each_request_gets_its_own_id(self) -> None:
        app, _ = make_app()
        async with client(app) as c:
            ids = {(await c.get("/echo")).headers["x-request-id"] for _ in range(20)}
        assert len(ids) == 20
        assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)

    def test_a_forked_process_does_not_repeat_its_parents_ids(self) -> None:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its first id, to the parent
            os.write(write, new_request_id().encode())
            os._exit(0)
        os.waitpid(pid, 0)
        child = os.read(read, 64).decode()
        os.close(read)
        os.close(write)
        assert child[:16] != new_request_id()[:16]
