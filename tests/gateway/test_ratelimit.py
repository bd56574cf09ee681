"""Rate limits: shared through Redis by every gateway; money fails closed without it."""

from __future__ import annotations

import asyncio
import os
import secrets
from contextlib import AsyncExitStack

import httpx
import pytest
from redis.asyncio import Redis

from services.kit.errors import ServiceUnavailable
from tests.gateway.conftest import Served, Stack
from tests.gateway.helpers import create_key, new_user_id


async def statuses(client: httpx.AsyncClient, key: str, n: int) -> list[httpx.Response]:
    return [
        await client.get(
            "/v1/ledger/balance", params={"user_id": "nobody"}, headers={"X-API-Key": key}
        )
        for _ in range(n)
    ]


class TestSharedLimit:
    async def test_burst_gets_429_and_two_gateways_share_one_limit(self, stack: Stack):
        from gateway.app import create_app

        key, _ = await create_key(stack.auth, "burst", ["ledger:read"])
        settings = stack.gateway_settings(
            gateway_rate_per_key=6, gateway_rate_per_ip=10_000, gateway_rate_window_seconds=60
        )
        async with AsyncExitStack() as stack_:
            one = await stack_.enter_async_context(Served(create_app(settings)))
            two = await stack_.enter_async_context(Served(create_app(settings)))
            a = await stack_.enter_async_context(httpx.AsyncClient(base_url=one.url))
            b = await stack_.enter_async_context(httpx.AsyncClient(base_url=two.url))
            first = await statuses(a, key, 3) + await statuses(b, key, 3)
            # Admitted (a partner key, not linked to this user: the ledger says 403).
            assert [r.status_code for r in first] == [403] * 6
            assert int(first[0].headers["ratelimit-limit"]) == 6
            for client in (a, b):
                r = (await statuses(client, key, 1))[0]
                assert r.status_code == 429
                assert 1 <= int(r.headers["retry-after"]) <= 60
                assert r.headers["ratelimit-remaining"] == "0"
                assert r.json()["error"]["code"] == "rate_limited"
            r = await a.get(
                "/api/unified/user-info",
                params={"user_id": new_user_id()},
                headers={"X-API-Key": key},
            )
            assert r.status_code == 429 and r.json()["error"] == "Rate limit exceeded"
            assert "retry-after" in r.headers


class TestRedisDown:
    async def test_money_fails_closed_reads_fail_open(self):
        from gateway.ratelimit import Limit, RateLimiter

        dead = Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.2)
        limiter = RateLimiter(dead, os.environ["KU_BUS_PREFIX"], 60)
        try:
            decision = await limiter.check([Limit("key", "k1", 10)], money=False)
            assert decision.limit == 10
            with pytest.raises(ServiceUnavailable):
                await limiter.check([Limit("key", "k2", 10)], money=True)
        finally:
            await dead.aclose()


async def _shared_count(redis: Redis, prefix: str, name: str) -> int:
    total = 0
    for key in await redis.keys(f"{prefix}.rl.{name}:*"):
        total += int(await redis.get(key) or 0)
    return total


class TestLeaseAhead:
    """A busy limit leases its next chunk while it still has a quarter of the last one,
    so requests do not queue behind the Redis round trip; the shared count still never
    passes the limit, and small limits lease only when a request finds no token."""

    async def test_a_busy_bucket_leases_its_next_chunk_ahead(self) -> None:
        from gateway.ratelimit import Limit, RateLimiter

        redis = Redis.from_url(os.environ["KU_REDIS_URL"])
        prefix = f"{os.environ['KU_BUS_PREFIX']}{secrets.token_hex(3)}"
        limiter = RateLimiter(redis, prefix, 3600)
        limit = Limit("key", "busy", 2000)  # chunks of 100, the next leased at 25 left
        try:
            for _ in range(74):
                await limiter.check([limit], money=True)
            await asyncio.sleep(0.05)
            assert await _shared_count(redis, prefix, "key:busy") == 100  # 26 left
            await limiter.check([limit], money=True)  # 25 left
            for _ in range(200):
                if await _shared_count(redis, prefix, "key:busy") == 200:
                    break
                await asyncio.sleep(0.01)
            assert await _shared_count(redis, prefix, "key:busy") == 200
        finally:
            await redis.aclose()

    async def test_two_gateways_leasing_ahead_admit_exactly_the_limit(self) -> None:
        from gateway.ratelimit import Limit, RateLimited, RateLimiter

        redis = Redis.from_url(os.environ["KU_REDIS_URL"])
        prefix = f"{os.environ['KU_BUS_PREFIX']}{secrets.token_hex(3)}"
        gateways = [RateLimiter(redis, prefix, 3600) for _ in range(2)]
        limit = Limit("key", "shared", 400)  # chunks of 20, the next leased at 5 left
        admitted = 0
        refused = [False, False]
        try:
            while not all(refused):
                for i, limiter in enumerate(gateways):
                    try:
                        await limiter.check([limit], money=True)
                        admitted += 1
                        refused[i] = False
                    except RateLimited:
                        refused[i] = True
                await asyncio.sleep(0)  # leases made ahead get to run
            assert admitted == 400
            assert await _shared_count(redis, prefix, "key:shared") == 400
        finally:
            await redis.aclose()

    async def test_a_small_limit_leases_only_when_empty(self) -> None:
        from gateway.ratelimit import Limit, RateLimiter

        redis = Redis.from_url(os.environ["KU_REDIS_URL"])
        prefix = f"{os.environ['KU_BUS_PREFIX']}{secrets.token_hex(3)}"
        limiter = RateLimiter(redis, prefix, 3600)
        limit = Limit("key", "small", 60)  # chunks of 3
        try:
            for _ in range(3):
                await limiter.check([limit], money=True)
            await asyncio.sleep(0.05)
            assert await _shared_count(redis, prefix, "key:small") == 3
            await limiter.check([limit], money=True)
            assert await _shared_count(redis, prefix, "key:small") == 6
        finally:
            await redis.aclose()
