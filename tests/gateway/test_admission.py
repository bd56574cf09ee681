"""A proxied request's admission without awaits when nothing needs I/O (a cached identity,
a token at hand in every limit), the same checks as the full one; and the body limit
applied by the proxy itself on the proxied chain (docs/ledger.md, "Stop 12")."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from gateway.ratelimit import Limit, RateLimited, RateLimiter
from services.kit.errors import Unauthorized
from tests.gateway.conftest import Served, Stack
from tests.gateway.helpers import asgi_post, create_key, revoke_key


@pytest.fixture
async def limiter() -> AsyncIterator[RateLimiter]:
    redis = Redis.from_url(os.environ["KU_REDIS_URL"])
    try:
        yield RateLimiter(redis, f"{os.environ['KU_BUS_PREFIX']}{secrets.token_hex(3)}", 3600)
    finally:
        await redis.aclose()


class TestCheckNow:
    async def test_spends_what_check_would_and_nothing_when_it_cannot(
        self, limiter: RateLimiter
    ) -> None:
        key = Limit("key", "k", 2000)  # chunks of 100
        ip = Limit("ip", "127.0.0.1", 2000)
        # No lease yet: nothing spent, nothing leased.
        assert limiter.check_now([key, ip], money=True) is None
        first = await limiter.check([key, ip], money=True)
        assert first.remaining == 1999
        now = limiter.check_now([key, ip], money=True)
        assert now is not None
        assert (now.limit, now.remaining) == (2000, 1998)
        assert 1 <= now.reset <= 3600
        after = await limiter.check([key, ip], money=True)
        assert after.remaining == 1997

        # One limit without a token: None, and the other limit's token is not spent.
        other = Limit("ip", "10.0.0.1", 2000)
        assert limiter.check_now([key, other], money=True) is None
        assert (await limiter.check([key], money=True)).remaining == 1996

    async def test_an_exhausted_limit_is_left_to_check(self, limiter: RateLimiter) -> None:
        tight = Limit("key", "tight", 2)  # chunks of 1
        await limiter.check([tight], money=False)
        await limiter.check([tight], money=False)
        assert limiter.check_now([tight], money=False) is None
        with pytest.raises(RateLimited):
            await limiter.check([tight], money=False)
        assert limiter.check_now([tight], money=False) is None

    async def test_leases_ahead_like_check(self, limiter: RateLimiter) -> None:
        busy = Limit("key", "busy", 2000)  # the next chunk leased at 25 left
        await limiter.check([busy], money=True)
        for _ in range(74):
            assert limiter.check_now([busy], money=True) is not None
        bucket = limiter._buckets[busy.name]
        assert bucket.tokens == 25 and bucket.refill is not None
        await bucket.refill
        assert bucket.tokens == 125


class TestCachedIdentity:
    async def test_cached_is_authenticates_answer_or_none(self, stack: Stack) -> None:
        from gateway.auth import Authenticator
        from gateway.upstream import Upstreams

        settings = stack.gateway_settings()
        upstreams = Upstreams(settings)
        await upstreams.start()
        try:
            auth = Authenticator(settings, upstreams)
            key, prefix = await create_key(stack.auth, "penora", ["ledger:read"])
            assert auth.cached(key, None) is None  # never asked auth yet
            identity = await auth.authenticate(key, None)
            assert auth.cached(key, None) is identity
            assert auth.cached(None, f"Bearer {key}") is identity  # the OpenAI-style header
            assert auth.cached(None, f"Basic {key}") is None
            assert auth.cached(None, None) is None

            token = stack.signing.token("u" + secrets.token_hex(4))
            assert auth.cached(None, f"Bearer {token}") is None
            user = await auth.authenticate(None, f"Bearer {token}")
            assert auth.cached(None, f"Bearer {token}") is user

            # Expired, refused or revoked entries are authenticate's to answer.
            wrong = f"ku_{prefix}_" + "B" * 43
            with pytest.raises(Unauthorized):
                await auth.authenticate(wrong, None)
            assert auth.cached(wrong, None) is None  # a negative entry
            for entry in auth._keys.values():
                entry.valid_until = time.monotonic() - 1
            assert auth.cached(key, None) is None
            await auth.authenticate(key, None)
            auth.revoke_prefix(prefix)
            assert auth.cached(key, None) is None
        finally:
            await upstreams.stop()


async def _counting_admits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from gateway.access import Access

    calls: list[int] = []
    full = Access.admit

    async def admit(self: Access, **kwargs: Any) -> Any:
        calls.append(1)
        return await full(self, **kwargs)

    monkeypatch.setattr(Access, "admit", admit)
    return calls


class TestProxiedAdmission:
    async def test_only_the_first_request_awaits_the_full_admission(
        self, stack: Stack, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from gateway.app import create_app

        calls = await _counting_admits(monkeypatch)
        key, prefix = await create_key(stack.auth, "penora", ["ledger:read"])
        headers = {"X-API-Key": key}
        async with Served(create_app(stack.gateway_settings())) as gw:
            async with httpx.AsyncClient(base_url=gw.url) as client:
                statuses = []
                for _ in range(20):  # fresh buckets: 100 tokens leased by the first
                    r = await client.get(
                        "/v1/ledger/balance", params={"user_id": "nobody"}, headers=headers
                    )
                    statuses.append(r.status_code)
                    assert r.headers["ratelimit-limit"] == "6000"
                # Admitted every time: the ledger answered (no such account).
                assert statuses == [404] * 20
                assert len(calls) == 1
                assert int(r.headers["ratelimit-remaining"]) == 6000 - 20

                # Revoked: the cache entry goes, and the full admission refuses it.
                await revoke_key(stack.auth, prefix)
                for _ in range(100):
                    r = await client.get(
                        "/v1/ledger/balance", params={"user_id": "nobody"}, headers=headers
                    )
                    if r.status_code == 401:
                        break
                    await asyncio.sleep(0.05)
                assert r.status_code == 401


class TestProxiedBodyLimit:
    """The proxied chain has no BodyLimitMiddleware: the proxy refuses a declared length
    over the limit itself, the same way, before the route or the caller is looked at;
    inside CORS now, so a browser can read the 413."""

    async def _post(
        self, app: Any, path: str, length: bytes
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", length),
            (b"origin", b"https://penora.example"),
        ]
        answer = await asgi_post(app, path, headers)
        assert answer.pulled == 0
        return answer.status, answer.headers, answer.body

    async def test_413_before_anything_with_cors_headers(self, stack: Stack) -> None:
        from gateway.app import create_app
        from services.kit.testing.plugin import running

        settings = stack.gateway_settings(
            gateway_max_body_bytes=100_000, cors_origins="https://penora.example"
        )
        app = create_app(settings)
        async with running(app):
            for path in ("/v1/ledger/debits", "/v1/no-such-api/x", "/.well-known/jwks.json"):
                for length in (b"100001", b"64000000", b"12x"):
                    status, headers, body = await self._post(app, path, length)
                    assert status == 413, (path, length, body)
                    assert headers[b"connection"] == b"close"
                    assert b"limit 100000 bytes" in body and b"payload_too_large" in body
                    assert headers[b"access-control-allow-origin"] == b"https://penora.example"
                    assert b"x-request-id" in headers
