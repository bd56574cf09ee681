"""Request bodies are bounded before anything reads them (gateway.limits), on every
route, compat included, without credentials; and the client address is the right-most
untrusted X-Forwarded-For hop (gateway.access.client_ip)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import pytest

from gateway.access import client_ip
from gateway.config import GatewaySettings
from services.kit.testing.plugin import running
from tests.gateway.conftest import Stack
from tests.gateway.helpers import HUGE, asgi_post

MB = 1_000_000
COMPAT_POSTS = [
    "/api/unified/save-project",
    "/api/unified/deduct-credits",
    "/api/unified/create-user",
    "/api/cross-app/auth",
]
NATIVE_POSTS = ["/v1/ledger/debits", "/v1/workspace/projects"]


async def _call(
    app: Any, path: str, *, declared: int | None, headers: Sequence[tuple[bytes, bytes]] = ()
) -> tuple[int, bytes, int]:
    """Send a 64 MB body to `app` at the ASGI level: (status, body, bytes the app pulled)."""
    raw = [(b"content-type", b"application/json"), *headers]
    if declared is not None:
        raw.append((b"content-length", str(declared).encode()))
    else:
        raw.append((b"transfer-encoding", b"chunked"))
    answer = await asgi_post(app, path, raw)
    return answer.status, answer.body, answer.pulled


@pytest.fixture(scope="module")
async def gateway_app(stack: Stack) -> Any:
    from gateway.app import create_app

    app = create_app(stack.gateway_settings())
    async with running(app):
        yield app


class TestBodyLimits:
    @pytest.mark.parametrize("path", COMPAT_POSTS + NATIVE_POSTS)
    async def test_declared_64mb_is_413_before_reading_anything(self, gateway_app, path):
        status, body, pulled = await _call(gateway_app, path, declared=HUGE)
        assert status == 413, body
        assert pulled == 0
        assert b"payload_too_large" in body

    @pytest.mark.parametrize("path", COMPAT_POSTS)
    async def test_unsized_64mb_is_cut_before_1mb_is_read(self, gateway_app, path):
        status, body, pulled = await _call(gateway_app, path, declared=None)
        assert status == 413, body
        assert pulled < MB, pulled
        assert b'"success":false' in body  # the seeds' shape on their routes

    async def test_with_a_key_it_is_the_same(self, gateway_app):
        status, _, pulled = await _call(
            gateway_app,
            "/api/unified/deduct-credits",
            declared=None,
            headers=[(b"x-api-key", b"ku_abcdefgh_" + b"A" * 43)],
        )
        assert status == 413 and pulled < MB

    async def test_the_gateway_stays_healthy(self, stack: Stack, gw: httpx.AsyncClient):
        for path in COMPAT_POSTS:
            r = await gw.post(
                path, content=b"x" * 2_000_000, headers={"content-type": "application/json"}
            )
            assert r.status_code == 413, r.text
        r = await gw.get("/health")
        assert r.status_code == 200
        # Still answering, in the seeds' shape (this stack's auth has no SSO configured).
        r = await gw.post("/api/cross-app/auth", json={"token": "not-a-jwt"})
        assert r.status_code in (401, 503) and r.json()["success"] is False


class TestClientAddress:
    def _ip(self, peer: str, forwarded: str | None, **settings: Any) -> str:
        headers = {b"x-forwarded-for": forwarded.encode()} if forwarded else {}
        scope = {"client": (peer, 1234)}
        return client_ip(scope, headers, GatewaySettings(**settings))

    def test_forwarded_is_ignored_unless_trusted(self):
        assert self._ip("10.0.0.5", "6.6.6.6") == "10.0.0.5"

    def test_right_most_untrusted_hop_is_the_client(self):
        # The client wrote "6.6.6.6" itself; our proxy (10.0.0.5) appended the real peer.
        ip = self._ip("10.0.0.5", "6.6.6.6, 203.0.113.7", gateway_trust_forwarded=True)
        assert ip == "203.0.113.7"
        ip = self._ip("10.0.0.5", "6.6.6.6, 203.0.113.7, 10.0.0.9", gateway_trust_forwarded=True)
        assert ip == "203.0.113.7"

    def test_a_peer_that_is_not_our_proxy_is_the_client(self):
        ip = self._ip("198.51.100.1", "6.6.6.6", gateway_trust_forwarded=True)
        assert ip == "198.51.100.1"
