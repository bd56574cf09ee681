"""Redis connection and a consumer-group reader for the event streams.

`Consumer` reads with XREADGROUP, acks only after the handler succeeds, and
reclaims entries another consumer left pending (XAUTOCLAIM) so a crashed
process loses nothing. Handlers must be idempotent by event id; `handled_once`
records the id in the handler's own transaction.
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
from services.kit.outbox import decode_event, event_issuer

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

    async def _handle(self, stream: str, entry_id: bytes | str, fields: dict[Any, Any]) -> None:
        expected = stream_service(stream)
        if expected is None or event_issuer(fields) != expected:
            # Not signed by the service whose stream this is: someone wrote to Redis
            # directly. Drop it (acked, so it is not redelivered forever) and say so.
            EVENTS_HANDLED.labels(self.group, "?", "forged").inc()
            log.warning("dropped an unsigned or forged entry %s on %s", entry_id, stream)
            await self.redis.xack(stream, self.group, entry_id)
            return
        event = decode_event(fields)
        if self.topics is None or event["topic"] in self.topics:
            try:
                await self.handler(event)
            except Exception:
                EVENTS_HANDLED.labels(self.group, event["topic"], "error").inc()
                log.exception("handler failed for event %s; left pending", event["id"])
                return
            EVENTS_HANDLED.labels(self.group, event["topic"], "ok").inc()
        await self.redis.xack(stream, self.group, entry_id)

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
        response = await self.redis.xreadgroup(
            self.group,
            self.name,
            {s: ">" for s in self.streams},
            count=self.batch,
            block=self.block_ms if block_ms is None else block_ms,
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
                if loops % 30 == 0:
                    await self.reclaim()
                await self.poll_once()
                loops += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("consumer %s failed: %s", self.group, exc)
                loops = 0
                await asyncio.sleep(1)
