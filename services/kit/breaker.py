"""A circuit breaker per provider whose state lives in Redis, so every process of every
service shares it: one process seeing a provider fail opens it for all.

States (the usual three):

- closed: calls pass; each failure counts in a window of `window_seconds`; at
  `failure_threshold` failures the breaker opens.
- open: calls are refused (`allow()` is False) until `open_seconds` have passed.
- half-open: after that, one caller at a time gets a trial call (a short Redis lock);
  a success closes the breaker, a failure opens it again.

All transitions are single Redis commands or a small Lua script, so two processes
racing see one outcome. `closed_cache_seconds` lets a hot path skip the Redis
read: a breaker seen closed is trusted for that long by this process (its own
failures clear it at once; another process's opening is seen that much later).
A Redis outage fails open (calls pass, state unknown): the breaker protects
providers, it must not take the service down with Redis.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("ku.breaker")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

# KEYS: failures, opened_at. ARGV: now, window, threshold, open_seconds.
# Count a failure; open the breaker when the threshold is reached within the window.
_FAILURE = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if n >= tonumber(ARGV[3]) or redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('SET', KEYS[2], ARGV[1], 'EX', math.max(tonumber(ARGV[4]) * 20, 3600))
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class BreakerState:
    name: str
    state: str
    failures: int
    opened_at: float | None


class CircuitBreaker:
    def __init__(
        self,
        redis: Redis,
        name: str,
        *,
        prefix: str,
        failure_threshold: int = 5,
        window_seconds: int = 60,
        open_seconds: float = 30.0,
        closed_cache_seconds: float = 0.0,
    ) -> None:
        self.redis = redis
        self.closed_cache_seconds = closed_cache_seconds
        self._closed_until = 0.0
        self.name = name
        self.failure_threshold = failure_threshold
        self.window_seconds = window_seconds
        self.open_seconds = open_seconds
        base = f"{prefix}:breaker:{name}"
        self._failures = f"{base}:failures"
        self._opened = f"{base}:opened_at"
        self._trial = f"{base}:trial"

    async def allow(self) -> bool:
        """May a call go to the provider now? (Half-open: one trial caller at a time.)"""
        if self._closed_until and time.monotonic() < self._closed_until:
            return True
        try:
            opened = await self.redis.get(self._opened)
            if opened is None:
                if self.closed_cache_seconds:
                    self._closed_until = time.monotonic() + self.closed_cache_seconds
                return True
            if time.time() - float(opened) < self.open_seconds:
                return False
            # Half-open: the first caller to take the trial lock tries the provider.
            return bool(
                await self.redis.set(self._trial, "1", nx=True, ex=max(1, int(self.open_seconds)))
            )
        except RedisError as exc:
            log.warning(
                "breaker %s: Redis unavailable (%s); letting the call through", self.name, exc
            )
            return True

    async def record_success(self) -> None:
        try:
            await self.redis.delete(self._failures, self._opened, self._trial)
        except RedisError:
            pass

    async def record_failure(self) -> bool:
        """Count a failure; True when the breaker is (now) open."""
        self._closed_until = 0.0
        try:
            opened = await self.redis.eval(  # type: ignore[misc]
                _FAILURE,
                2,
                self._failures,
                self._opened,
                repr(time.time()),
                str(self.window_seconds),
                str(self.failure_threshold),
                str(self.open_seconds),
            )
            await self.redis.delete(self._trial)
            if opened:
                log.warning("breaker %s: open", self.name)
            return bool(opened)
        except RedisError:
            return False

    async def state(self) -> BreakerState:
        try:
            opened, failures = await self.redis.mget(self._opened, self._failures)
        except RedisError:
            return BreakerState(self.name, CLOSED, 0, None)
        count = int(failures or 0)
        if opened is None:
            return BreakerState(self.name, CLOSED, count, None)
        at = float(opened)
        state = OPEN if time.time() - at < self.open_seconds else HALF_OPEN
        return BreakerState(self.name, state, count, at)

    async def reset(self) -> None:
        await self.record_success()
