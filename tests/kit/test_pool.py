"""The proxy's HTTP/1.1 client (services.kit.pool) against a real uvicorn server: keep-alive
reuse, streamed bodies both ways, timeouts (one timer per connection, re-armed), refused
connections, HEAD."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from services.kit.pool import Pool
from tests.gateway.conftest import Served, free_port


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    if path == "/slow":
        await asyncio.sleep(2)
    if path == "/sleep":
        await asyncio.sleep(float(scope["query_string"].decode()))
    if path == "/stall":  # the head and a first piece, then nothing for 2 s
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"one,", "more_body": True})
        await asyncio.sleep(2)
        await send({"type": "http.response.body", "body": b"two"})
        return
    if path == "/burst":  # the head alone, then three pieces written back to back
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.2)
        for part in (b"one,", b"two,", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/chunks":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"one,", b"two,", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b""})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    answer = orjson.dumps(
        {
            "port": scope["client"][1],
            "method": scope["method"],
            "size": len(body),
            "sha": hashlib.sha256(body).hexdigest(),
            "query": scope["query_string"].decode(),
            "x": dict(scope["headers"]).get(b"x-test", b"").decode(),
        }
    )
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async with Served(app) as s:
        yield s


async def call(pool: Pool, method: str = "GET", target: bytes = b"/", **kw: Any) -> dict[str, Any]:
    resp = await pool.request(method, target, kw.get("headers", []), kw.get("body"), read_timeout=5)
    try:
        assert resp.status == 200
        return dict(orjson.loads(await resp.read()))
    finally:
        resp.release()


async def test_keep_alive_reuses_one_connection(served: Served) -> None:
    pool = Pool(served.url, connect_timeout=2)
    try:
        first = await call(pool, target=b"/a?x=1", headers=[(b"x-test", b"hi")])
        assert first["query"] == "x=1" and first["x"] == "hi"
        ports = {(await call(pool))["port"] for _ in range(5)}
        assert ports == {first["port"]}
    finally:
        pool.close()


async def test_idle_connections_are_not_reused_after_the_idle_limit(served: Served) -> None:
    pool = Pool(served.url, connect_timeout=2, idle_seconds=0)
    try:
        first = (await call(pool))["port"]
        await asyncio.sleep(0.01)
        assert (await call(pool))["port"] != first
    finally:
        pool.close()


async def test_bodies_in_one_piece_and_streamed(served: Served) -> None:
    pool = Pool(served.url, connect_timeout=2)
    data = bytes(range(256)) * 1000

    async def parts() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 10_000):
            yield data[i : i + 10_000]

    try:
        sha = hashlib.sha256(data).hexdigest()
        whole = await call(pool, "POST", body=data)
        assert whole["size"] == len(data) and whole["sha"] == sha
        streamed = await call(pool, "PUT", body=parts())
        assert streamed["size"] == len(data) and streamed["sha"] == sha
        assert streamed["port"] == whole["port"]  # the connection stays usable after
    finally:
        pool.close()


async def test_a_streamed_response_comes_in_pieces(served: Served) -> None:
    pool = Pool(served.url, connect_timeout=2)
    try:
        resp = await pool.request("GET", b"/chunks", [], None, read_timeout=5)
        assert resp.status == 200 and resp.content_length is None
        pieces = [piece async for piece in resp.iter_chunks()]
        resp.release()
        assert b"".join(pieces) == b"one,two,three" and len(pieces) > 1
        assert (await call(pool))["method"] == "GET"
    finally:
        pool.close()


async def test_an_answer_left_unread_closes_its_connection(served: Served) -> None:
    pool = Pool(served.url, connect_timeout=2)
    try:
        first = (await call(pool))["port"]
        resp = await pool.request("GET", b"/chunks", [], None, read_timeout=5)
        resp.release()  # nothing read: the connection cannot carry another request
        assert (await call(pool))["port"] != first
    finally:
        pool.close()


async def test_read_timeout(served: Served) -> None:
    pool = Pool(served.url, connect_timeout=2)
    try:
        with pytest.raises(TimeoutError):
            await pool.request("GET", b"/slow", [], None, read_timeout=0.2)
        assert not pool._idle  # the timed-out connection is not pooled
        assert (await call(pool))["method"] == "GET"
    finally:
        pool.close()


async def _timed(pool: Pool, target: bytes, read_timeout: float) -> dict[str, Any]:
    resp = await pool.request("GET", target, [], None, read_timeout=read_timeout)
    try:
        return dict(orjson.loads(await resp.read()))
    finally:
        resp.release()


async def test_read_timeout_per_request_on_a_reused_connection(served: Served) -> None:
    # The connection's one timer is armed by the first request's deadline; it fires
    # while the second (started later, slower than what is left of the first's
    # timeout) is in flight: the second has its own full timeout and succeeds.
    pool = Pool(served.url, connect_timeout=2)
    loop = asyncio.get_running_loop()
    try:
        port = (await _timed(pool, b"/sleep?0", 1.0))["port"]
        await asyncio.sleep(0.7)
        assert (await _timed(pool, b"/sleep?0.5", 1.0))["port"] == port
        # ... and a wait past its own deadline still fails, not before it.
        started = loop.time()
        with pytest.raises(TimeoutError):
            await pool.request("GET", b"/slow", [], None, read_timeout=0.5)
        assert loop.time() - started >= 0.45
        assert (await call(pool))["method"] == "GET"  # a fresh connection
    finally:
        pool.close()


async def test_read_timeout_between_pieces_of_a_body(served: Served) -> None:
    pool = Pool(served.url, connect_timeout=2)
    try:
        resp = await pool.request("GET", b"/stall", [], None, read_timeout=0.3)
        assert resp.status == 200
        with pytest.raises(TimeoutError):
            await resp.read()
        resp.release()
        assert not pool._idle  # the stalled connection is not pooled
        assert (await call(pool))["method"] == "GET"
    finally:
        pool.close()


async def test_refused_connection_is_an_oserror() -> None:
    pool = Pool(f"http://127.0.0.1:{free_port()}", connect_timeout=2)
    with pytest.raises(OSError):
        await pool.request("GET", b"/", [], None, read_timeout=1)


async def test_head_answers_without_waiting_for_a_body(served: Served) -> None:
    pool = Pool(served.url, connect_timeout=2)
    try:
        resp = await pool.request("HEAD", b"/", [], None, read_timeout=2)
        assert resp.status == 200 and resp.content_length and resp.content_length > 0
        assert await resp.read() == b""
        resp.release()
        assert (await call(pool))["method"] == "GET"
    finally:
        pool.close()


async def test_a_held_socket_is_read_after_the_hold_and_its_pieces_come_joined(
    served: Served,
) -> None:
    pool = Pool(served.url, connect_timeout=2)
    loop = asyncio.get_running_loop()
    try:
        resp = await pool.request("GET", b"/burst", [], None, read_timeout=5)
        held_at = loop.time()
        resp.hold(0.5)  # the pieces, written meanwhile, wait in the kernel
        # ... and come out as one piece: everything received so far, joined.
        assert await resp.read_any() == b"one,two,three"
        assert loop.time() - held_at >= 0.5 - 0.005
        assert await resp.read_any() is None and resp.complete
        resp.release()
        assert (await call(pool))["method"] == "GET"
    finally:
        pool.close()


async def test_a_connection_released_while_held_reads_again(served: Served) -> None:
    pool = Pool(served.url, connect_timeout=2)
    try:
        resp = await pool.request("GET", b"/", [], None, read_timeout=5)
        port = orjson.loads(await resp.read())["port"]
        resp.hold(60)  # longer than the next request's read timeout
        resp.release()
        # The same connection answers the next request at once, not after the hold.
        assert (await call(pool))["port"] == port
    finally:
        pool.close()
