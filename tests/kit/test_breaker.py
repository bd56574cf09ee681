"""The shared circuit breaker, on the real Redis: two breaker objects (two processes'
view) share one state."""

from __future__ import annotations

import os
import uuid

import pytest
from redis.asyncio import Redis

from services.kit.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


@pytest.fixture
async def redis():
    client = Redis.from_url(os.environ["KU_REDIS_URL"])
    yield client
    await client.aclose()


def _pair(redis: Redis, **kw):
    name = f"prov-{uuid.uuid4().hex[:8]}"
    prefix = os.environ["KU_BUS_PREFIX"]
    return CircuitBreaker(redis, name, prefix=prefix, **kw), CircuitBreaker(
        redis, name, prefix=prefix, **kw
    )


class TestBreaker:
    async def test_opens_for_every_process_at_threshold(self, redis):
        a, b = _pair(redis, failure_threshold=3, open_seconds=30)
        assert await a.allow() and await b.allow()
        await a.record_failure()
        await b.record_failure()
        assert (await a.state()).state == CLOSED
        assert await a.record_failure() is True
        assert not await b.allow()
        assert (await b.state()).state == OPEN

    async def test_half_open_lets_one_trial_through_then_closes(self, redis):
        a, b = _pair(redis, failure_threshold=1, open_seconds=0.2)
        await a.record_failure()
        assert not await a.allow()
        import asyncio

        await asyncio.sleep(0.25)
        assert (await a.state()).state == HALF_OPEN
        assert await a.allow() is True
        assert await b.allow() is False  # one trial at a time
        await a.record_success()
        assert (await b.state()).state == CLOSED
        assert await b.allow()

    async def test_failed_trial_opens_again(self, redis):
        a, _ = _pair(redis, failure_threshold=1, open_seconds=0.2)
        await a.record_failure()
        import asyncio

        await asyncio.sleep(0.25)
        assert await a.allow()
        assert await a.record_failure() is True
        assert not await a.allow()

    async def test_successes_reset_the_count(self, redis):
        a, _ = _pair(redis, failure_threshold=2)
        await a.record_failure()
        await a.record_success()
        await a.record_failure()
        assert (await a.state()).state == CLOSED

    async def test_closed_cache_trusts_closed_for_its_window_only(self, redis):
        import asyncio

        a, b = _pair(redis, failure_threshold=1, open_seconds=30, closed_cache_seconds=0.3)
        assert await a.allow() and await b.allow()  # both saw it closed
        assert await a.record_failure() is True
        assert not await a.allow()  # its own failure clears its cache at once
        assert await b.allow()  # the other process trusts what it saw, for its window
        await asyncio.sleep(0.35)
        assert not await b.allow()  # then reads Redis again: open
