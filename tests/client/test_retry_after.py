"""Retry-After is honoured, seen from the server: a local HTTP server answers the first
request 429 with `Retry-After: 1`, the next 200, and notes when each arrived. The retry
must arrive at least a second after the first request (a lower bound on the server's
own clock; nothing here bounds how long the test may take)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from ku_client import AsyncKuClient, KuClient, RetryPolicy

RETRY_AFTER = 1
# What the client waits without Retry-After: at most this (full jitter), far below 1 s.
POLICY = RetryPolicy(max_retries=3, backoff_seconds=0.05)
BALANCE = {"user_id": "u1", "available": 50, "held": 0, "total": 50, "by_source": []}


class LimitedOnce(ThreadingHTTPServer):
    """429 with Retry-After to the first request, 200 with a balance to the others."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.arrivals: list[float] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: LimitedOnce
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.server.arrivals.append(time.monotonic())
        if len(self.server.arrivals) == 1:
            body = {"error": {"code": "rate_limited", "message": "Slow down", "detail": {}}}
            self._answer(429, body, {"Retry-After": str(RETRY_AFTER)})
        else:
            self._answer(200, BALANCE, {})

    def _answer(self, status: int, body: Any, headers: dict[str, str]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {**headers, "Content-Type": "application/json"}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[LimitedOnce]:
    server = LimitedOnce()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def waited(server: LimitedOnce) -> float:
    first, second = server.arrivals
    return second - first


class TestRetryAfterIsHonoured:
    def test_sync(self, server: LimitedOnce):
        with KuClient(server.url, api_key="k", retry=POLICY) as client:
            assert client.balance("u1").available_milli == 50_000
        assert waited(server) >= RETRY_AFTER

    async def test_async(self, server: LimitedOnce):
        async with AsyncKuClient(server.url, api_key="k", retry=POLICY) as client:
            assert (await client.balance("u1")).available_milli == 50_000
        # asyncio's timers may fire up to its clock's resolution early.
        assert waited(server) >= RETRY_AFTER - 0.01

    def test_longer_than_the_policy_waits_is_raised_at_once(self, server: LimitedOnce):
        patient_for_less = RetryPolicy(max_retries=3, max_retry_after_seconds=0.5)
        with KuClient(server.url, api_key="k", retry=patient_for_less) as client:
            # Longer than it will wait: the 429 is raised, no second request is made.
            with pytest.raises(Exception, match="Slow down"):
                client.balance("u1")
        assert len(server.arrivals) == 1
