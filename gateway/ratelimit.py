"""Rate limits shared by every gateway instance, without a Redis round trip per request.

Fixed windows aligned to the clock, counted in Redis (`<prefix>.rl.<dimension>:<id>:<window>`).
Each instance *leases* tokens from the shared counter in small chunks (a Lua
script grants at most what is left) and spends them locally, so the shared
count never exceeds the limit, however many instances run, and a busy key
costs one Redis call per chunk instead of one per request. Tokens leased but
unspent when a window ends are simply lost (a slight under-use, never an excess).

Redis down: money operations fail closed (503); reads fail open.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field

from redis.asyncio import Redis

from services.kit.errors import ServiceUnavailable, TooManyRequests

log = logging.getLogger("ku.gateway.ratelimit")

LEASE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local grant = math.min(tonumber(ARGV[2]), tonumber(ARGV[1]) - used)
if grant <= 0 then return {0, used} end
used = redis.call('INCRBY', KEYS[1], grant)
if used == grant then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return {grant, used}
"""
MAX_CHUNK = 100
# A bucket leasing chunks at least this big asks for the next one in the background
# when a quarter of its tokens is left, so a busy key's requests do not queue behind
# the round trip (below it, a lease is made when a request finds no token).
PREFETCH_CHUNK = 20
REDIS_BACKOFF_SECONDS = 1.0


@dataclass
class Limit:
    dimension: str  # key | user | ip
    ident: str
    limit: int
    name: str = field(init=False, repr=False, compare=False)  # the bucket's name

    def __post_init__(self) -> None:
        self.name = f"{self.dimension}:{self.ident}"


@dataclass
class Decision:
    limit: int
    remaining: int
    reset: int  # seconds until the window ends


class RateLimited(TooManyRequests):
    def headers(self) -> dict[str, str]:
        return {
            "Retry-After": str(self.retry_after),
            "RateLimit-Limit": str(self.detail.get("limit", 0)),
            "RateLimit-Remaining": "0",
            "RateLimit-Reset": str(self.retry_after),
        }


class _Bucket:
    __slots__ = ("window", "tokens", "used", "lock", "exhausted", "refill", "refill_at")

    def __init__(self, window: int, limit: int) -> None:
        self.window = window
        self.tokens = 0
        self.used = 0  # the shared count after our last lease
        self.lock = asyncio.Lock()
        self.exhausted = False
        self.refill: asyncio.Task[None] | None = None  # a lease made ahead of need
        chunk = _chunk(limit)
        # Lease ahead at this many tokens left (-1: never, the chunks are too small).
        self.refill_at = chunk // 4 if chunk >= PREFETCH_CHUNK else -1


class RateLimiter:
    def __init__(self, redis: Redis, prefix: str, window_seconds: int) -> None:
        self.redis = redis
        self.prefix = prefix
        self.window_seconds = window_seconds
        self._buckets: dict[str, _Bucket] = {}
        self._script = redis.register_script(LEASE)
        self._redis_down_until = 0.0

    def _window(self, now: float) -> int:
        return int(now // self.window_seconds)

    async def check(self, limits: list[Limit], *, money: bool) -> Decision:
        """Spend one token from each limit; 429 when one is used up."""
        now = time.time()
        window = self._window(now)
        reset = max(1, math.ceil((window + 1) * self.window_seconds - now))
        tightest: Decision | None = None
        for limit in limits:
            remaining = await self._take(limit, window, money)
            if remaining < 0:
                raise RateLimited(
                    "Rate limit exceeded",
                    retry_after=reset,
                    limit=limit.limit,
                    dimension=limit.dimension,
                )
            if tightest is None or remaining < tightest.remaining:
                tightest = Decision(limit.limit, remaining, reset)
        return tightest or Decision(0, 0, reset)

    def check_now(self, limits: list[Limit], *, money: bool) -> Decision | None:
        """`check`, when it needs no Redis call and refuses nothing: every limit's bucket
        of this window holds a token. Then one token is spent from each, as `check`
        would, and the same decision returned; otherwise nothing is spent and None
        returned (the caller awaits `check`). A busy key's requests take this path
        between leases: no coroutine per limit (docs/ledger.md, "Stop 12")."""
        now = time.time()
        window = self._window(now)
        buckets = self._buckets
        for limit in limits:
            bucket = buckets.get(limit.name)
            if bucket is None or bucket.window != window or bucket.tokens <= 0:
                return None
        reset = max(1, math.ceil((window + 1) * self.window_seconds - now))
        tightest, least = 0, -1
        for limit in limits:
            remaining = self._spend(buckets[limit.name], limit, window, money)
            if least < 0 or remaining < least:
                tightest, least = limit.limit, remaining
        return Decision(tightest, max(least, 0), reset)

    async def _take(self, limit: Limit, window: int, money: bool) -> int:
        """Remaining tokens after taking one (shared estimate), or -1 when refused."""
        name = limit.name
        bucket = self._buckets.get(name)
        if bucket is None or bucket.window != window:
            if len(self._buckets) > 50_000:
                self._sweep(window)
            bucket = self._buckets[name] = _Bucket(window, limit.limit)
        if bucket.tokens <= 0:
            if bucket.exhausted:
                return -1
            async with bucket.lock:
                if bucket.tokens <= 0 and not bucket.exhausted:
                    allowed = await self._lease(bucket, name, limit.limit, window, money)
                    if allowed is None:  # Redis down, a read: let it through
                        return limit.limit
            if bucket.tokens <= 0:
                return -1
        return self._spend(bucket, limit, window, money)

    def _spend(self, bucket: _Bucket, limit: Limit, window: int, money: bool) -> int:
        """Take one of the bucket's tokens (it has one); lease ahead when it runs low.
        The remaining tokens after it (shared estimate)."""
        bucket.tokens -= 1
        if bucket.tokens <= bucket.refill_at and bucket.refill is None and not bucket.exhausted:
            bucket.refill = asyncio.ensure_future(
                self._refill(bucket, limit.name, limit.limit, window, money)
            )
        return max(0, limit.limit - bucket.used + bucket.tokens)

    async def _refill(
        self, bucket: _Bucket, name: str, limit: int, window: int, money: bool
    ) -> None:
        """The next chunk, leased while the bucket still has tokens. A failure is left
        to the request that finds the bucket empty (it leases, or fails open/closed)."""
        try:
            async with bucket.lock:
                if not bucket.exhausted:
                    await self._lease(bucket, name, limit, window, money)
        except Exception:
            pass
        finally:
            bucket.refill = None

    async def _lease(
        self, bucket: _Bucket, name: str, limit: int, window: int, money: bool
    ) -> bool | None:
        if time.monotonic() < self._redis_down_until:
            return self._unavailable(money)
        chunk = _chunk(limit)
        key = f"{self.prefix}.rl.{name}:{window}"
        try:
            granted, used = await self._script(
                keys=[key], args=[limit, chunk, self.window_seconds * 2000]
            )
        except Exception as exc:  # Redis unreachable or erroring
            log.warning("rate limiter: redis failed: %s", exc)
            self._redis_down_until = time.monotonic() + REDIS_BACKOFF_SECONDS
            return self._unavailable(money)
        bucket.tokens += int(granted)
        bucket.used = int(used)
        if int(granted) == 0:
            bucket.exhausted = True
        return True

    @staticmethod
    def _unavailable(money: bool) -> None:
        if money:
            raise ServiceUnavailable(
                "Rate limiting is unavailable; money operations are paused",
                code="rate_limiter_unavailable",
            )
        return None

    def _sweep(self, window: int) -> None:
        for name in [n for n, b in self._buckets.items() if b.window != window]:
            del self._buckets[name]


def _chunk(limit: int) -> int:
    """Tokens leased at a time for `limit`: a twentieth of it, 1 to MAX_CHUNK."""
    return max(1, min(MAX_CHUNK, limit // 20))


def rate_headers(decision: Decision) -> list[tuple[bytes, bytes]]:
    return [
        (b"ratelimit-limit", str(decision.limit).encode()),
        (b"ratelimit-remaining", str(decision.remaining).encode()),
        (b"ratelimit-reset", str(decision.reset).encode()),
    ]
