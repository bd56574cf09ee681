"""Group commit: concurrent ledger operations share one transaction and one round trip.

Every request hands its operation to `GroupCommitter.submit()`. A flusher takes what
is queued (at most `max_ops`), sorts it by user so concurrent batches lock wallets in
the same order, and calls `ledger.apply_batch()` once; then it takes what queued
meanwhile, until the queue is empty.

How many flushers (`_spawn`): one starts at once when none runs, so a lone request
never waits for a timer. A second, up to `max_inflight`, only when the queue holds more
than the running ones take in their next batches (a batch request, a burst), or when no
batch has started or finished for `STALL_SECONDS` (a batch waiting on a lock must not
hold up every other user). Otherwise what arrives during a batch waits for it and goes
into the next one: fewer, larger statements, and Postgres's cost is mostly per
statement (a debit costs ~4x less in a batch of 100 than alone). Under 32 clients this
took single debits for many users from ~6,200 to ~7,500/s (three interleaved pairs of
runs) against three flushers started eagerly (docs/ledger.md, "Stop 14").

A user (a hold, a transaction) is in at most one in-flight batch of this process: an
operation whose user is in a batch being applied waits in the queue for the next one.
Two batches holding the same user would only wait for each other's wallet lock
(Postgres applies them one after the other anyway); waiting in the queue instead lets
one busy user's operations gather into one larger batch, one commit for all of them
(bench/ledger.py, "http debit, hot user"). Operations of the same user keep their order.

Failure isolation, innermost first:
- business failures come back as results, so they never abort a batch;
- `apply_batch` runs each operation in its own subtransaction, so an operation the
  database refuses (a NUL byte jsonb cannot store, a constraint) is that operation's
  error result and its neighbours commit; an operation Python cannot even encode (a
  lone surrogate) is answered before the batch is sent;
- a lost connection (a terminated backend, a restart) retries the whole batch on a
  fresh connection with backoff. Safe: every operation carries its idempotency key or
  is its own natural key (a hold resolves once), so one that did commit before the
  connection dropped replays instead of applying twice;
- anything else that fails the statement (a deadlock) retries the operations one
  transaction each, as a last resort.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

import asyncpg
import orjson

log = logging.getLogger("ku.ledger.batcher")

_RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
# The connection, not the statement, failed: the server went away or is restarting.
_CONNECTION_LOST = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.CannotConnectNowError,
    # What asyncpg raises when a statement was in flight as the socket closed.
    asyncpg.InternalClientError,
    ConnectionError,
    OSError,
)
# Backoff between attempts on a lost connection: ~10 s in all, long enough for a
# restart or a failover, short enough that a client's own timeout is not reached first.
_RECONNECT_DELAYS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 2.0, 2.5, 2.5)
# No batch started or finished for this long while operations queue: start one more
# flusher (`_spawn`). A batch of 64 takes a few ms; one waiting on a row lock can take
# up to the lock's holder's transaction.
STALL_SECONDS = 0.02

Item = tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]


class LedgerUnavailable(Exception):
    """The database could not be reached through every reconnect attempt."""


def _error(status: int, code: str, message: str) -> dict[str, Any]:
    return {"status": status, "error": {"code": code, "message": message, "detail": {}}}


class GroupCommitter:
    def __init__(self, pool: asyncpg.Pool, *, max_ops: int = 64, max_inflight: int = 6) -> None:
        self.pool = pool
        self.max_ops = max_ops
        self.max_inflight = max_inflight
        self._queue: deque[Item] = deque()
        self._inflight = 0
        # Lock keys (`_lock_key`) of the operations in the batches being applied.
        self._busy: set[str] = set()
        # When a batch last started or finished (time.monotonic()).
        self._progress = 0.0

    async def submit(self, op: dict[str, Any]) -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((op, future))
        self._spawn()
        return await future

    async def submit_many(self, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Queue many operations at once (a batch request): they share the flushers'
        `apply_batch` statements with everyone else's, so 1,000 operations are about
        1,000 / max_ops statements, max_inflight of them at a time. Results in order;
        an operation whose statement could not reach the database is its own 503."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[dict[str, Any]]] = []
        for op in ops:
            future: asyncio.Future[dict[str, Any]] = loop.create_future()
            self._queue.append((op, future))
            futures.append(future)
        self._spawn()
        results: list[dict[str, Any]] = []
        for future in futures:
            try:
                results.append(await future)
            except LedgerUnavailable:
                results.append(
                    _error(
                        503,
                        "ledger_unavailable",
                        "The ledger's database is unavailable; retry with the same key",
                    )
                )
        return results

    def _spawn(self) -> None:
        """Start flushers for what is queued (the module's docstring says when)."""
        now = time.monotonic()
        while self._inflight < self.max_inflight:
            if not self._inflight:
                self._progress = now  # the clock of a stall starts with the first flusher
            elif len(self._queue) <= self._inflight * self.max_ops:
                if now - self._progress < STALL_SECONDS:
                    return
                self._progress = now  # one more flusher per stall
            self._inflight += 1
            asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while batch := self._take():
                keys = {key for op, _ in batch if (key := _lock_key(op))}
                self._busy |= keys
                self._progress = time.monotonic()
                try:
                    await self._run(batch)
                finally:
                    self._busy -= keys
                    self._progress = time.monotonic()
        finally:
            self._inflight -= 1
            # Operations left for a busy user, with no flusher to take them: start one.
            if self._queue and not self._inflight:
                self._spawn()

    def _take(self) -> list[Item]:
        """The next batch: up to `max_ops` queued operations, in queue order, none of
        whose users is in a batch being applied (those stay queued, in order)."""
        queue = self._queue
        if not self._busy:
            return [queue.popleft() for _ in range(min(self.max_ops, len(queue)))]
        batch: list[Item] = []
        kept: list[Item] = []
        while queue and len(batch) < self.max_ops:
            item = queue.popleft()
            (batch if _lock_key(item[0]) not in self._busy else kept).append(item)
        queue.extendleft(reversed(kept))
        return batch

    async def _run(self, batch: list[Item]) -> None:
        batch.sort(key=lambda item: _lock_key(item[0]))
        encoded: list[tuple[bytes, asyncio.Future[dict[str, Any]]]] = []
        for op, future in batch:
            try:
                encoded.append((orjson.dumps(op), future))
            except TypeError:
                # Text Python cannot encode as UTF-8 (a lone surrogate): this operation
                # alone is refused; the batch goes on without it.
                future.set_result(
                    _error(422, "invalid_input", "The operation holds text that is not UTF-8")
                )
        if not encoded:
            return
        try:
            results = await self._execute([raw for raw, _ in encoded])
        except LedgerUnavailable as exc:
            for _, future in encoded:
                if not future.done():
                    future.set_exception(exc)
            return
        except Exception as exc:
            log.warning("batch of %d failed (%r); retrying one by one", len(encoded), exc)
            await asyncio.gather(*(self._run_single(item, exc) for item in encoded))
            return
        for (_, future), result in zip(encoded, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def _run_single(
        self, item: tuple[bytes, asyncio.Future[dict[str, Any]]], error: Exception
    ) -> None:
        raw, future = item
        for attempt in range(4):
            if not isinstance(error, (*_RETRYABLE, asyncpg.UniqueViolationError)):
                break
            await asyncio.sleep(0.005 * attempt)
            try:
                (result,) = await self._execute([raw])
            except LedgerUnavailable as exc:
                if not future.done():
                    future.set_exception(exc)
                return
            except Exception as exc:
                error = exc
                continue
            if not future.done():
                future.set_result(result)
            return
        log.error("ledger operation failed: %r", error)
        if not future.done():
            future.set_result(_error(500, "ledger_error", "The ledger could not apply this"))

    async def _execute(self, ops: list[bytes]) -> list[dict[str, Any]]:
        # One statement outside an explicit transaction is its own transaction: one
        # round trip, committed when it returns (no BEGIN/COMMIT trips on the event loop).
        payload = (b"[" + b",".join(ops) + b"]").decode()
        last: Exception | None = None
        for delay in _RECONNECT_DELAYS:
            if delay:
                await asyncio.sleep(delay)
            try:
                async with self.pool.acquire() as conn:
                    raw = await conn.fetchval("SELECT ledger.apply_batch($1::json)::text", payload)
            except _CONNECTION_LOST as exc:
                # The pool drops a closed connection on release; the next acquire opens
                # a fresh one. The operations retry under their keys.
                log.warning("ledger connection lost (%r); retrying the batch", exc)
                last = exc
                continue
            return orjson.loads(raw)
        raise LedgerUnavailable(str(last))


def _lock_key(op: dict[str, Any]) -> str:
    return str(op.get("user_id") or op.get("hold_id") or op.get("transaction_id") or "")
