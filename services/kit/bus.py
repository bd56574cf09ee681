"""Redis connection and a consumer-group reader for the event streams.

`Consumer` reads with XREADGROUP, acks only after the handler succeeds, and
reclaims entries another consumer left pending (XAUTOCLAIM) so a crashed
process loses nothing. Entries delivered to this consumer and not acked (a handler
that failed, a read whose answer was lost to a timeout or a dropped connection) are
read again from its own pending list with a backoff (`retry_delay`, doubling to
`retry_max`), so a transient failure delays an event by a fraction of a second rather
than by `reclaim_idle_ms`. Handlers must be idempotent by event id; `handled_once`
records the id in the handler's own transaction.

An entry may hold several events (an outbox row holding a batch: see
services.kit.outbox): its signature is checked once, then the handler gets each event,
one at a time, in order. The entry is acked when all of them succeeded; if one fails,
the entry stays pending and its retry resumes at the failed event (this process
remembers how far it got; another process taking the entry over starts again from the
first, which `handled_once` makes harmless).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError
from sqlalchemy import Column, DateTime, MetaData, Table, Text, func, text
from sqlalchemy.ext.asyncio import AsyncSession

from services.kit.background import BackgroundLoop
from services.kit.metrics import EVENTS_HANDLED
from services.kit.outbox import decode_events, event_issuer

log = logging.getLogger("ku.bus")

Handler = Callable[[dict[str, Any]], Awaitable[None]]


def redis_from_url(url: str) -> Redis:
    return Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)


def processed_events_table(metadata: MetaData) -> Table:
    return Table(
        "processed_events",
        metadata,
        Column("consumer", Text, primary_key=True),
        Column("event_id", Text, primary_key=True),
        Column("processed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    )


async def handled_once(session: AsyncSession, table: Table, consumer: str, event_id: str) -> bool:
    """True the first time this consumer sees `event_id` (in the caller's transaction)."""
    result = await session.execute(
        text(
            f"INSERT INTO {table.schema}.{table.name} (consumer, event_id) VALUES (:c, :e)"
            " ON CONFLICT DO NOTHING RETURNING event_id"
        ),
        {"c": consumer, "e": event_id},
    )
    return result.first() is not None


def stream_service(stream: str) -> str | None:
    """`<prefix>.events.<service>` -> the service that alone may sign its entries."""
    _, sep, service = stream.rpartition(".events.")
    return service if sep and service else None


class Consumer(BackgroundLoop):
    def __init__(
        self,
        redis: Redis,
        streams: list[str],
        group: str,
        handler: Handler,
        *,
        topics: set[str] | None = None,
        name: str | None = None,
        block_ms: int = 1000,
        reclaim_idle_ms: int = 30_000,
        batch: int = 50,
        retry_delay: float = 0.2,
        retry_max: float = 5.0,
    ) -> None:
        self.redis = redis
        self.streams = streams
        self.group = group
        self.handler = handler
        self.topics = topics
        self.name = name or f"{socket.gethostname()}-{id(self):x}"
        self.block_ms = block_ms
        self.reclaim_idle_ms = reclaim_idle_ms
        self.batch = batch
        self.retry_delay = retry_delay
        self.retry_max = retry_max
        # When to read this consumer's own pending entries again (None: nothing owed).
        self._retry_at: float | None = None
        self._backoff = retry_delay
        # (stream, entry id) -> events of that entry already handled, for an entry whose
        # handler failed part way (its retry resumes there).
        self._progress: dict[tuple[str, str], int] = {}
        super().__init__()
        self.task_name = f"consumer-{group}"

    async def ensure_groups(self) -> None:
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, self.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _unwanted(self, fields: dict[Any, Any]) -> bool:
        """An entry of a topic this consumer does not handle: acked unread (neither its
        signature checked nor its payload parsed; a busy stream is mostly these)."""
        if self.topics is None:
            return False
        topic = fields.get(b"topic", fields.get("topic"))
        if isinstance(topic, bytes):
            topic = topic.decode(errors="replace")
        return topic not in self.topics

    def _owe_retry(self) -> None:
        if self._retry_at is None:
            self._retry_at = asyncio.get_running_loop().time() + self._backoff

    async def _handle(self, stream: str, entry_id: bytes | str, fields: dict[Any, Any]) -> bool:
        """Handle one entry (every event it holds); False when the handler failed (the
        entry stays pending)."""
        expected = stream_service(stream)
        events = None
        if expected is not None and event_issuer(fields) == expected:
            try:
                events = decode_events(fields)
            except (KeyError, ValueError):
                pass  # signed, but not an entry a relay writes: dropped like a forgery
        if events is None:
            # Not signed by the service whose stream this is: someone wrote to Redis
            # directly. Drop it (acked, so it is not redelivered forever) and say so.
            EVENTS_HANDLED.labels(self.group, "?", "forged").inc()
            log.warning("dropped an unsigned or forged entry %s on %s", entry_id, stream)
            await self.redis.xack(stream, self.group, entry_id)
            return True
        key = (stream, entry_id.decode() if isinstance(entry_id, bytes) else entry_id)
        start = self._progress.pop(key, 0)
        for position in range(start, len(events)):
            event = events[position]
            if self.topics is not None and event["topic"] not in self.topics:
                continue
            try:
                await self.handler(event)
            except Exception:
                EVENTS_HANDLED.labels(self.group, event["topic"], "error").inc()
                log.exception("handler failed for event %s; left pending", event["id"])
                if len(self._progress) >= 10_000:  # entries another consumer took over
                    self._progress.clear()
                self._progress[key] = position
                self._owe_retry()
                return False
            EVENTS_HANDLED.labels(self.group, event["topic"], "ok").inc()
        await self.redis.xack(stream, self.group, entry_id)
        return True

    async def retry_own_pending(self) -> int:
        """Handle again every entry delivered to this consumer and not acked (XREADGROUP
        from id 0 returns them). Returns how many failed again."""
        failed = 0
        for stream in self.streams:
            response = await self.redis.xreadgroup(
                self.group, self.name, {stream: "0"}, count=self.batch
            )
            for _, entries in response or []:
                for entry_id, fields in entries:
                    if not fields:  # trimmed from the stream: nothing left to handle
                        await self.redis.xack(stream, self.group, entry_id)
                    elif not await self._handle(stream, entry_id, fields):
                        failed += 1
        return failed

    async def _retry_if_due(self) -> None:
        now = asyncio.get_running_loop().time()
        if self._retry_at is None or now < self._retry_at:
            return
        self._retry_at = None
        if await self.retry_own_pending():
            self._backoff = min(self._backoff * 2, self.retry_max)
            self._retry_at = now + self._backoff
        else:
            self._backoff = self.retry_delay

    async def reclaim(self) -> int:
        """Take over entries pending longer than `reclaim_idle_ms` and handle them."""
        count = 0
        for stream in self.streams:
            _, entries, *_ = await self.redis.xautoclaim(
                stream, self.group, self.name, self.reclaim_idle_ms, "0-0", count=self.batch
            )
            for entry_id, fields in entries:
                if fields:
                    await self._handle(stream, entry_id, fields)
                    count += 1
        return count

    async def poll_once(self, block_ms: int | None = None) -> int:
        block = self.block_ms if block_ms is None else block_ms
        if self._retry_at is not None:  # wake in time for the retry
            due = self._retry_at - asyncio.get_running_loop().time()
            block = max(1, min(block, int(due * 1000)))
        response = await self.redis.xreadgroup(
            self.group,
            self.name,
            {s: ">" for s in self.streams},
            count=self.batch,
            block=block,
        )
        count = 0
        for stream, entries in response or []:
            stream_name = stream.decode() if isinstance(stream, bytes) else stream
            unwanted = []
            for entry_id, fields in entries:
                if self._unwanted(fields):
                    unwanted.append(entry_id)
                else:
                    await self._handle(stream_name, entry_id, fields)
                count += 1
            if unwanted:  # one XACK for the batch, not one round trip per entry
                await self.redis.xack(stream_name, self.group, *unwanted)
        return count

    async def run(self) -> None:
        loops = 0
        while not self.stopping:
            try:
                if loops == 0:
                    await self.ensure_groups()
                    self._owe_retry()  # a read before the failure may have been lost
                if loops % 30 == 0:
                    await self.reclaim()
                await self._retry_if_due()
                await self.poll_once()
                loops += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("consumer %s failed: %s", self.group, exc)
                loops = 0
                await asyncio.sleep(1)
