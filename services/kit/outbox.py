"""Transactional outbox: events are rows written in the same transaction as the
change they describe, then relayed to a Redis Stream.

The relay polls (every 50 ms while busy, backing off to `interval` when idle)
rather than using LISTEN/NOTIFY: NOTIFY takes a database-wide lock at commit
that serializes every committing transaction, which would cap the ledger's
throughput at one WAL flush at a time.

Authenticity: the relay signs every entry as its service (Ed25519, the process's
principal key: `signed_fields`), and `services.kit.bus.Consumer` drops entries whose
signature is missing, wrong, or from another issuer than the stream's service. Anyone
who can write to Redis can add entries; only the service can make one that counts
(a forged `user.created` grants no welcome credits).

One row, one entry: the relay publishes each row as ONE stream entry with ONE
signature, whatever it holds. A row whose payload is a JSON array holds that many
events of its topic, in order (the ledger writes one row per batch of operations);
its entry carries the array, and readers unpack it (`decode_events`) into the same
events, with the same ids, as if each had had its own row: the row's id for an object
payload, `uuid5(row id, str(position))` for each element of an array (stable across
re-relays, so dedupe by event id holds). A signature covers the whole entry, so a
batch is accepted or refused whole. `emit` writes one event (an object) per row.
Entries written before batching (one element per entry, an object payload) read the
same way.

Why not one entry per event: the relay spent about a third of the ledger process's
CPU signing (~27 µs each) and XADDing every `credits.changed` event of a batch
separately, and every reader (the gateway's hub, each service's consumers) paid a
read, an XACK and a signature check (~60 µs) per event; now each is paid per batch.

Delivery guarantee: an event whose transaction rolls back never exists; one that
commits is published at least once, even if Redis was down at commit time (the
relay keeps the row until XADD succeeds). A crash between XADD and the row's
deletion publishes it again, so consumers dedupe by event id (handlers use
`services.kit.bus.handled_once`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis
from sqlalchemy import Column, DateTime, MetaData, Table, Text, func, insert
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.ext.asyncio import AsyncSession

from services.kit.background import BackgroundLoop
from services.kit.metrics import EVENTS_PUBLISHED

log = logging.getLogger("ku.outbox")


def outbox_table(metadata: MetaData) -> Table:
    return Table(
        "outbox",
        metadata,
        Column("id", UUID(as_uuid=True), primary_key=True),
        Column("topic", Text, nullable=False),
        Column("payload", JSONB, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    )


async def emit(session: AsyncSession, table: Table, topic: str, payload: dict[str, Any]) -> str:
    """Write an event in the caller's transaction; it is relayed after commit."""
    event_id = uuid.uuid4()
    await session.execute(insert(table).values(id=event_id, topic=topic, payload=payload))
    return str(event_id)


# Entries (rows) signed between two yields to the event loop (OutboxRelay.relay_once).
SIGN_BETWEEN_YIELDS = 16


def stream_name(prefix: str, service: str) -> str:
    return f"{prefix}.events.{service}"


class OutboxRelay(BackgroundLoop):
    """Moves committed outbox rows to `<prefix>.events.<service>`, one signed entry
    per row (`batch`: rows per claim).

    Safe with several relays running: rows are claimed with SKIP LOCKED.
    """

    def __init__(
        self,
        dsn: str,
        redis: Redis,
        schema: str,
        stream: str,
        *,
        issuer: str,
        interval: float = 0.25,
        busy_interval: float = 0.05,
        batch: int = 200,
        maxlen: int = 1_000_000,
    ) -> None:
        self.dsn = dsn
        self.redis = redis
        self.schema = schema
        self.stream = stream
        self.issuer = issuer
        self.interval = interval
        self.busy_interval = busy_interval
        self.batch = batch
        self.maxlen = maxlen
        super().__init__()
        self.task_name = f"outbox-relay-{schema}"

    async def relay_once(self, conn: asyncpg.Connection) -> int:
        """Publish one claim (at most `batch` rows, each one entry); returns how many
        events were published."""
        return (await self._relay(conn))[1]

    async def _relay(self, conn: asyncpg.Connection) -> tuple[int, int]:
        """(rows, events) published by one claim."""
        async with conn.transaction():
            # Claimed and deleted in one statement, in the transaction that publishes
            # them: if the XADDs fail, the rollback keeps the rows (BEGIN, this, COMMIT:
            # three round trips a claim, not a SELECT and a DELETE apart). The payload
            # as the text Postgres keeps (asyncpg returns jsonb as str): an array row
            # goes out whole, so nothing here parses or splits it.
            rows = await conn.fetch(
                f"DELETE FROM {self.schema}.outbox WHERE id IN (SELECT id"
                f" FROM {self.schema}.outbox"
                " ORDER BY created_at, id LIMIT $1 FOR UPDATE SKIP LOCKED)"
                " RETURNING id, topic, created_at, payload, CASE WHEN jsonb_typeof(payload)"
                " = 'array' THEN jsonb_array_length(payload) ELSE 1 END AS events",
                self.batch,
            )
            if not rows:
                return 0, 0
            # RETURNING has no order: published in the order they were written.
            rows.sort(key=_row_order)
            pipe = self.redis.pipeline(transaction=False)
            events = 0
            for signed, row in enumerate(rows):
                if signed and signed % SIGN_BETWEEN_YIELDS == 0:
                    # The relay shares the event loop with the service's requests: an
                    # Ed25519 signature is 0.03-0.1 ms of CPU, so a claim of 200 rows
                    # signed in one go would stall every request in flight. Let them
                    # run between groups of signatures.
                    await asyncio.sleep(0)
                events += row["events"]
                pipe.xadd(
                    self.stream,
                    signed_fields(
                        self.issuer,
                        str(row["id"]),
                        row["topic"],
                        row["payload"],
                        row["created_at"].isoformat(),
                    ),
                    maxlen=self.maxlen,
                    approximate=True,
                )
            await pipe.execute()
        EVENTS_PUBLISHED.labels(self.stream).inc(events)
        return len(rows), events

    async def run(self) -> None:
        conn: asyncpg.Connection | None = None
        delay = self.busy_interval
        try:
            while not self.stopping:
                try:
                    if conn is None or conn.is_closed():
                        conn = await asyncpg.connect(self.dsn)
                    moved, _ = await self._relay(conn)
                    while moved >= self.batch:
                        moved, _ = await self._relay(conn)
                    delay = self.busy_interval if moved else min(self.interval, delay * 2)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # Redis or Postgres down: keep the rows, retry later.
                    log.warning("outbox relay failed: %s", exc)
                    if conn is not None and not conn.is_closed():
                        conn.terminate()
                    conn = None
                    delay = self.interval
                await asyncio.sleep(delay)
        finally:
            if conn is not None and not conn.is_closed():
                conn.terminate()


def _row_order(row: asyncpg.Record) -> tuple[Any, Any]:
    return row["created_at"], row["id"]


def _signed_text(event_id: str, topic: str, payload: str, created_at: str) -> bytes:
    return "\n".join((event_id, topic, created_at, payload)).encode()


def signed_fields(
    issuer: str, event_id: str, topic: str, payload: str, created_at: str = ""
) -> dict[Any, Any]:
    """A stream entry signed as `issuer` (this process must hold that principal key)."""
    from services.kit.principal import sign_bytes

    sig = sign_bytes(issuer, _signed_text(event_id, topic, payload, created_at))
    return {
        "id": event_id,
        "topic": topic,
        "payload": payload,
        "created_at": created_at,
        "issuer": issuer,
        "sig": sig,
    }


def _text(fields: dict[bytes | str, bytes | str]) -> dict[str, str]:
    def s(v: bytes | str) -> str:
        return v.decode() if isinstance(v, bytes) else v

    return {s(k): s(v) for k, v in fields.items()}


def event_issuer(fields: dict[bytes | str, bytes | str]) -> str | None:
    """The service that signed this entry, or None when unsigned or the signature fails."""
    from services.kit.principal import verify_bytes

    data = _text(fields)
    issuer, sig = data.get("issuer"), data.get("sig")
    if not issuer or not sig:
        return None
    text = _signed_text(
        data.get("id", ""),
        data.get("topic", ""),
        data.get("payload", ""),
        data.get("created_at", ""),
    )
    return issuer if verify_bytes(issuer, text, sig) else None


def decode_events(fields: dict[bytes | str, bytes | str]) -> list[dict[str, Any]]:
    """The events one entry holds, in order: one for an object payload (its id is the
    entry's), one per element for an array (a batch row: each id derived from the row's
    id and the position, the same on every relay of the row). Raises KeyError or
    ValueError for an entry that is not one (check the signature first: `event_issuer`)."""
    data = _text(fields)
    topic, created_at = data["topic"], data.get("created_at")
    payload = orjson.loads(data["payload"])
    if not isinstance(payload, list):
        return [{"id": data["id"], "topic": topic, "payload": payload, "created_at": created_at}]
    row = uuid.UUID(data["id"])
    return [
        {"id": str(uuid.uuid5(row, str(i))), "topic": topic, "payload": p, "created_at": created_at}
        for i, p in enumerate(payload)
    ]


def entry_payloads(fields: dict[bytes | str, bytes | str]) -> tuple[list[Any], bool]:
    """The payloads of an entry's events, in order, and whether the entry is a batch (an
    array row), without event ids: for a reader that does not dedupe (the gateway's event
    hub), `decode_events` less its per-event uuid5. Raises KeyError or ValueError."""
    raw = fields.get(b"payload", fields.get("payload"))
    if raw is None:
        raise KeyError("payload")
    payload = orjson.loads(raw)
    return (payload, True) if isinstance(payload, list) else ([payload], False)


def decode_event(fields: dict[bytes | str, bytes | str]) -> dict[str, Any]:
    """The one event of a single-event entry (a ValueError for a batch: `decode_events`)."""
    data = _text(fields)
    payload = orjson.loads(data["payload"])
    if isinstance(payload, list):
        raise ValueError("a batch entry holds several events: read it with decode_events")
    return {
        "id": data["id"],
        "topic": data["topic"],
        "payload": payload,
        "created_at": data.get("created_at"),
    }
