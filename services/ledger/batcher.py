"""Group commit: concurrent ledger operations share one transaction and one round trip.

Every request hands its operation to `GroupCommitter.submit()`. Up to
`max_inflight` flushers run at once; each takes whatever is queued (at most
`max_ops`), sorts it by user so concurrent batches lock wallets in the same
order, and calls `ledger.apply_batch()` once. Business failures come back as
results, so they never abort a batch. If the batch itself fails (a deadlock, a
constraint, a lost connection) its operations are retried one transaction each,
so one bad operation cannot fail its neighbours.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import asyncpg
import orjson

log = logging.getLogger("ku.ledger.batcher")

_RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)


class GroupCommitter:
    def __init__(self, pool: asyncpg.Pool, *, max_ops: int = 64, max_inflight: int = 6) -> None:
        self.pool = pool
        self.max_ops = max_ops
        self.max_inflight = max_inflight
        self._queue: deque[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]] = deque()
        self._inflight = 0

    async def submit(self, op: dict[str, Any]) -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((op, future))
        if self._inflight < self.max_inflight:
            self._inflight += 1
            asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(self.max_ops, len(self._queue)))]
                await self._run(batch)
        finally:
            self._inflight -= 1

    async def _run(
        self, batch: list[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]]
    ) -> None:
        batch.sort(key=lambda item: _lock_key(item[0]))
        ops = [op for op, _ in batch]
        try:
            results = await self._execute(ops)
        except Exception as exc:
            if len(batch) == 1:
                await self._run_single(batch[0], first_error=exc)
                return
            log.warning("batch of %d failed (%s); retrying one by one", len(batch), exc)
            await asyncio.gather(*(self._run_single(item) for item in batch))
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def _run_single(
        self,
        item: tuple[dict[str, Any], asyncio.Future[dict[str, Any]]],
        first_error: Exception | None = None,
    ) -> None:
        op, future = item
        error = first_error
        for attempt in range(4):
            if error is not None and not isinstance(
                error, (*_RETRYABLE, asyncpg.UniqueViolationError)
            ):
                break
            if attempt:
                await asyncio.sleep(0.005 * attempt)
            try:
                (result,) = await self._execute([op])
            except Exception as exc:
                error = exc
                continue
            if not future.done():
                future.set_result(result)
            return
        if not future.done():
            future.set_exception(error or RuntimeError("ledger operation failed"))

    async def _execute(self, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # One statement outside an explicit transaction is its own transaction: one
        # round trip, committed when it returns (no BEGIN/COMMIT trips on the event loop).
        async with self.pool.acquire() as conn:
            raw = await conn.fetchval(
                "SELECT ledger.apply_batch($1::jsonb)::text", orjson.dumps(ops).decode()
            )
        return orjson.loads(raw)


def _lock_key(op: dict[str, Any]) -> str:
    return str(op.get("user_id") or op.get("hold_id") or op.get("transaction_id") or "")
