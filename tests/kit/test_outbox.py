"""The outbox's delivery guarantee and the consumer's ack/reclaim/dedupe, on real
Postgres and Redis."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import MetaData, text
from sqlalchemy.ext.asyncio import create_async_engine

from services.kit import principal
from services.kit.bus import Consumer, handled_once, processed_events_table
from services.kit.db import async_url, plain_url, sessionmaker_for, unit_of_work
from services.kit.outbox import (
    SIGN_BETWEEN_YIELDS,
    OutboxRelay,
    decode_event,
    decode_events,
    emit,
    event_issuer,
    outbox_table,
    signed_fields,
)

SCHEMA = "kit_outbox_test"


@pytest.fixture(scope="module")
async def tables(ku_database_url):
    metadata = MetaData(schema=SCHEMA)
    outbox = outbox_table(metadata)
    processed = processed_events_table(metadata)
    engine = create_async_engine(async_url(ku_database_url))
    async with engine.begin() as conn:
        await conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
        await conn.run_sync(metadata.create_all)
    yield engine, outbox, processed
    await engine.dispose()


@pytest.fixture
async def redis():
    client = Redis.from_url(os.environ["KU_REDIS_URL"])
    yield client
    await client.aclose()


def stream() -> str:
    # A stream of the (test) service "auth": only auth's signature counts on it.
    return f"{os.environ['KU_BUS_PREFIX']}.{uuid.uuid4().hex[:8]}.events.auth"


async def stream_ids(redis: Redis, name: str) -> list[str]:
    return [fields[b"id"].decode() for _, fields in await redis.xrange(name)]


class TestOutboxRelay:
    async def test_rolled_back_event_is_never_published(self, tables, redis, ku_database_url):
        engine, outbox, _ = tables
        name = stream()
        with pytest.raises(RuntimeError):
            async with unit_of_work(sessionmaker_for(engine)) as session:
                await emit(session, outbox, "thing.happened", {"n": 1})
                raise RuntimeError("the request failed after writing its event")
        relay = OutboxRelay(plain_url(ku_database_url), redis, SCHEMA, name, issuer="auth")
        conn = await asyncpg.connect(plain_url(ku_database_url))
        try:
            assert await relay.relay_once(conn) == 0
        finally:
            await conn.close()
        assert await stream_ids(redis, name) == []

    async def test_committed_event_survives_redis_being_down(self, tables, redis, ku_database_url):
        engine, outbox, _ = tables
        name = stream()
        async with unit_of_work(sessionmaker_for(engine)) as session:
            event_id = await emit(session, outbox, "thing.happened", {"n": 2})
        dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
        conn = await asyncpg.connect(plain_url(ku_database_url))
        try:
            with pytest.raises((OSError, ConnectionError, RedisError)):
                await OutboxRelay(
                    plain_url(ku_database_url), dead, SCHEMA, name, issuer="auth"
                ).relay_once(conn)
            assert (
                await conn.fetchval(
                    f"SELECT count(*) FROM {SCHEMA}.outbox WHERE id = $1", uuid.UUID(event_id)
                )
                == 1
            )
            # Redis is back: the same row goes out, then leaves the table.
            assert (
                await OutboxRelay(
                    plain_url(ku_database_url), redis, SCHEMA, name, issuer="auth"
                ).relay_once(conn)
                == 1
            )
            assert await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.outbox") == 0
        finally:
            await conn.close()
            await dead.aclose()
        assert await stream_ids(redis, name) == [event_id]


class TestConsumer:
    async def test_failed_handler_leaves_entry_for_reclaim_and_dedupes(self, tables, redis):
        engine, _, processed = tables
        name = stream()
        await redis.xadd(name, signed_fields("auth", "evt-1", "t", '{"x": 1}'))
        seen: list[str] = []

        async def crashing(event):
            raise RuntimeError("process died mid-event")

        async def handler(event):
            async with unit_of_work(sessionmaker_for(engine)) as session:
                if await handled_once(session, processed, "test", event["id"]):
                    seen.append(event["id"])

        first = Consumer(redis, [name], "g", crashing, name="a", reclaim_idle_ms=0)
        await first.ensure_groups()
        assert await first.poll_once(block_ms=100) == 1
        pending = await redis.xpending(name, "g")
        assert pending["pending"] == 1  # not acked: the handler failed

        second = Consumer(redis, [name], "g", handler, name="b", reclaim_idle_ms=0)
        assert await second.reclaim() == 1
        assert seen == ["evt-1"]
        assert (await redis.xpending(name, "g"))["pending"] == 0

        # A redelivery of the same event id is a no-op.
        await redis.xadd(name, signed_fields("auth", "evt-1", "t", '{"x": 1}'))
        assert await second.poll_once(block_ms=100) == 1
        assert seen == ["evt-1"]

    async def test_failed_handler_is_retried_soon_not_after_the_reclaim_idle_time(self, redis):
        """A transient failure (the database restarting, say) delays an event by the retry
        backoff: the entry is read again from the consumer's own pending list."""
        name = stream()
        attempts: list[str] = []
        handled = asyncio.Event()

        async def flaky(event):
            attempts.append(event["id"])
            if len(attempts) < 3:
                raise RuntimeError("database restarting")
            handled.set()

        consumer = Consumer(
            redis, [name], "g", flaky, name="a", reclaim_idle_ms=600_000, retry_delay=0.05
        )
        await consumer.ensure_groups()
        consumer.start()
        try:
            await redis.xadd(name, signed_fields("auth", "evt-flaky", "t", "{}"))
            await asyncio.wait_for(handled.wait(), 10)  # the reclaim would take 10 minutes
            await asyncio.sleep(0.2)  # the ack follows the handler
            assert (await redis.xpending(name, "g"))["pending"] == 0
        finally:
            await consumer.stop()
        assert attempts == ["evt-flaky"] * 3

    async def test_entries_delivered_but_never_handled_are_handled_on_start(self, redis):
        """A read whose answer was lost (a timeout, a dropped connection) leaves entries
        delivered to this consumer: the loop reads its own pending list when it starts
        and after every failure."""
        name = stream()
        seen: list[str] = []
        handled = asyncio.Event()

        async def handler(event):
            seen.append(event["id"])
            handled.set()

        await redis.xgroup_create(name, "g", id="0", mkstream=True)
        await redis.xadd(name, signed_fields("auth", "evt-lost", "t", "{}"))
        await redis.xreadgroup("g", "a", {name: ">"})  # delivered to "a"; the answer is lost
        consumer = Consumer(redis, [name], "g", handler, name="a", reclaim_idle_ms=600_000)
        consumer.start()
        try:
            await asyncio.wait_for(handled.wait(), 10)
            await asyncio.sleep(0.2)  # the ack follows the handler
            assert (await redis.xpending(name, "g"))["pending"] == 0
        finally:
            await consumer.stop()
        assert seen == ["evt-lost"]

    async def test_other_topics_are_acked_unread_and_a_forged_wanted_one_dropped(self, redis):
        name = stream()
        seen: list[str] = []

        async def handler(event):
            seen.append(event["id"])

        for i in range(3):
            await redis.xadd(name, signed_fields("auth", f"evt-other-{i}", "other", "{}"))
        await redis.xadd(name, signed_fields("auth", "evt-wanted", "wanted", "{}"))
        await redis.xadd(name, signed_fields("workspace", "evt-forged", "wanted", "{}"))
        consumer = Consumer(redis, [name], "g", handler, name="a", topics={"wanted"})
        await consumer.ensure_groups()
        assert await consumer.poll_once(block_ms=100) == 5
        assert seen == ["evt-wanted"]
        assert (await redis.xpending(name, "g"))["pending"] == 0  # all acked


class TestSignedEvents:
    async def test_unsigned_and_foreign_signed_entries_are_dropped(self, redis):
        name = stream()
        seen: list[str] = []

        async def handler(event):
            seen.append(event["id"])

        forged_sig = signed_fields("workspace", "evt-w", "t", '{"x": 1}')
        forged_sig["issuer"] = "auth"  # claims auth, signed with the workspace's key
        await redis.xadd(name, {"id": "evt-u", "topic": "t", "payload": "{}", "created_at": ""})
        await redis.xadd(name, signed_fields("workspace", "evt-o", "t", "{}"))  # other service
        await redis.xadd(name, forged_sig)
        tampered = signed_fields("auth", "evt-t", "t", '{"amount": 1}')
        tampered["payload"] = '{"amount": 1000000}'
        await redis.xadd(name, tampered)
        await redis.xadd(name, signed_fields("auth", "evt-ok", "t", "{}"))
        consumer = Consumer(redis, [name], "g", handler, name="a")
        await consumer.ensure_groups()
        assert await consumer.poll_once(block_ms=100) == 5
        assert seen == ["evt-ok"]
        assert (await redis.xpending(name, "g"))["pending"] == 0  # dropped, not redelivered

    async def test_relay_signs_as_its_service(self, tables, redis, ku_database_url):
        engine, outbox, _ = tables
        name = stream()
        async with unit_of_work(sessionmaker_for(engine)) as session:
            await emit(session, outbox, "thing.happened", {"n": 3})
        conn = await asyncpg.connect(plain_url(ku_database_url))
        try:
            relay = OutboxRelay(plain_url(ku_database_url), redis, SCHEMA, name, issuer="auth")
            while await relay.relay_once(conn):
                pass
        finally:
            await conn.close()
        entries = await redis.xrange(name)
        assert entries and all(event_issuer(f) == "auth" for _, f in entries)

    async def test_relay_lets_requests_run_between_signatures(
        self, tables, redis, ku_database_url, monkeypatch
    ):
        """The relay runs on the service's event loop: signing a batch must not hold the
        loop for the whole batch. A ticker task counts loop turns; every signature notes
        the count: no more than SIGN_BETWEEN_YIELDS signatures happen in one turn."""
        engine, outbox, _ = tables
        name = stream()
        async with unit_of_work(sessionmaker_for(engine)) as session:
            for n in range(4 * SIGN_BETWEEN_YIELDS):
                await emit(session, outbox, "thing.happened", {"n": n})
        turns = {"n": 0}
        seen: list[int] = []
        sign = principal.sign_bytes

        def noting(issuer: str, data: bytes) -> str:
            seen.append(turns["n"])
            return sign(issuer, data)

        monkeypatch.setattr(principal, "sign_bytes", noting)

        async def tick() -> None:
            while True:
                turns["n"] += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        conn = await asyncpg.connect(plain_url(ku_database_url))
        try:
            relay = OutboxRelay(plain_url(ku_database_url), redis, SCHEMA, name, issuer="auth")
            while await relay.relay_once(conn):
                pass
        finally:
            ticker.cancel()
            await conn.close()
        assert len(seen) >= 4 * SIGN_BETWEEN_YIELDS
        assert max(Counter(seen).values()) <= SIGN_BETWEEN_YIELDS


async def insert_rows(conn: asyncpg.Connection, rows: list[tuple[uuid.UUID, object]]) -> None:
    """Outbox rows as the ledger writes them (an array payload: a batch), in this order."""
    for i, (row_id, payload) in enumerate(rows):
        await conn.execute(
            f"INSERT INTO {SCHEMA}.outbox (id, topic, payload, created_at)"
            " VALUES ($1, 'credits.changed', $2::jsonb, now() + $3 * interval '1 ms')",
            row_id,
            orjson.dumps(payload).decode(),
            i,
        )


def batch_ids(row_id: uuid.UUID, count: int) -> list[str]:
    return [str(uuid.uuid5(row_id, str(i))) for i in range(count)]


class TestBatchRows:
    """A row whose payload is an array (the ledger's one row per batch) is ONE stream
    entry with ONE signature; readers unpack it into its events, with the ids they had
    when each was its own entry (`uuid5(row id, position)`)."""

    async def test_a_batch_row_is_one_entry_with_one_signature(
        self, tables, redis, ku_database_url, monkeypatch
    ):
        name = stream()
        batch, single = uuid.uuid4(), uuid.uuid4()
        signatures: list[bytes] = []
        sign = principal.sign_bytes

        def counting(issuer: str, data: bytes) -> str:
            signatures.append(data)
            return sign(issuer, data)

        monkeypatch.setattr(principal, "sign_bytes", counting)
        conn = await asyncpg.connect(plain_url(ku_database_url))
        try:
            await conn.execute(f"DELETE FROM {SCHEMA}.outbox")
            await insert_rows(conn, [(batch, [{"n": 1}, {"n": 2}, {"n": 3}]), (single, {"n": 4})])
            relay = OutboxRelay(plain_url(ku_database_url), redis, SCHEMA, name, issuer="auth")
            assert await relay.relay_once(conn) == 4  # events
            assert await relay.relay_once(conn) == 0
        finally:
            await conn.close()
        entries = [fields for _, fields in await redis.xrange(name)]
        assert len(entries) == 2 and len(signatures) == 2
        assert all(event_issuer(f) == "auth" for f in entries)
        events = [e for f in entries for e in decode_events(f)]
        assert [e["id"] for e in events] == [*batch_ids(batch, 3), str(single)]
        assert [e["payload"] for e in events] == [{"n": n} for n in (1, 2, 3, 4)]
        assert {e["topic"] for e in events} == {"credits.changed"}
        # The single-event reader refuses a batch rather than hand out a list payload.
        assert decode_event(entries[1])["id"] == str(single)
        with pytest.raises(ValueError):
            decode_event(entries[0])

    async def test_a_claim_is_at_most_batch_rows(self, tables, redis, ku_database_url):
        name = stream()
        rows = [(uuid.uuid4(), [{"n": 2 * i}, {"n": 2 * i + 1}]) for i in range(3)]
        conn = await asyncpg.connect(plain_url(ku_database_url))
        try:
            await conn.execute(f"DELETE FROM {SCHEMA}.outbox")
            await insert_rows(conn, rows)
            relay = OutboxRelay(
                plain_url(ku_database_url), redis, SCHEMA, name, issuer="auth", batch=2
            )
            assert await relay.relay_once(conn) == 4
            assert await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.outbox") == 1
            assert await relay.relay_once(conn) == 2
        finally:
            await conn.close()
        events = [e for _, f in await redis.xrange(name) for e in decode_events(f)]
        assert [e["payload"]["n"] for e in events] == list(range(6))

    async def test_a_claim_is_one_statement_between_begin_and_commit(
        self, tables, redis, ku_database_url
    ):
        """The rows are claimed and deleted by one DELETE ... RETURNING inside the
        transaction that publishes them (not a SELECT ... FOR UPDATE and a DELETE apart),
        published in the order they were written, and the table is empty after."""
        name = stream()
        # Ids that sort unlike the rows' order of writing: the order is created_at's.
        rows = [(uuid.UUID(int=(7 - i) << 64), [{"n": i}]) for i in range(5)]
        conn = await asyncpg.connect(plain_url(ku_database_url))
        statements: list[str] = []
        try:
            await conn.execute(f"DELETE FROM {SCHEMA}.outbox")
            await insert_rows(conn, rows)

            def log(query: asyncpg.connection.LoggedQuery) -> None:
                statements.append(query.query.split()[0].upper())

            conn.add_query_logger(log)
            relay = OutboxRelay(plain_url(ku_database_url), redis, SCHEMA, name, issuer="auth")
            assert await relay.relay_once(conn) == 5
            conn.remove_query_logger(log)
            assert await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.outbox") == 0
        finally:
            await conn.close()
        assert statements == ["BEGIN;", "DELETE", "COMMIT;"]
        events = [e for _, f in await redis.xrange(name) for e in decode_events(f)]
        assert [e["payload"]["n"] for e in events] == list(range(5))

    async def test_every_event_once_and_in_order_even_when_re_relayed(
        self, tables, redis, ku_database_url
    ):
        """A crash between XADD and the rows' deletion publishes the rows again: the
        consumer's handler sees each event once (by id), in order, one at a time."""
        engine, _, processed = tables
        name = stream()
        batch, single = uuid.uuid4(), uuid.uuid4()

        class CrashAfterXadd:
            """Redis whose pipelines run, then the relay dies before it commits the
            rows' deletion."""

            def __init__(self, redis: Redis) -> None:
                self.redis = redis

            def pipeline(self, transaction: bool = False) -> Any:
                pipe = self.redis.pipeline(transaction=transaction)
                run = pipe.execute

                async def execute(raise_on_error: bool = True) -> list[Any]:
                    await run(raise_on_error)
                    raise ConnectionError("the relay died after XADD")

                pipe.execute = execute  # type: ignore[method-assign]
                return pipe

        conn = await asyncpg.connect(plain_url(ku_database_url))
        try:
            await conn.execute(f"DELETE FROM {SCHEMA}.outbox")
            await insert_rows(conn, [(batch, [{"n": 1}, {"n": 2}, {"n": 3}]), (single, {"n": 4})])
            crashing = CrashAfterXadd(redis)
            dying = OutboxRelay(plain_url(ku_database_url), crashing, SCHEMA, name, issuer="auth")
            relay = OutboxRelay(plain_url(ku_database_url), redis, SCHEMA, name, issuer="auth")
            with pytest.raises(ConnectionError):
                await dying.relay_once(conn)
            assert await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.outbox") == 2
            assert await relay.relay_once(conn) == 4
        finally:
            await conn.close()
        assert await redis.xlen(name) == 4  # both rows, twice: one entry per row

        calls: list[dict] = []
        seen: list[int] = []

        async def handler(event):
            calls.append(event)
            async with unit_of_work(sessionmaker_for(engine)) as session:
                if await handled_once(session, processed, f"batch-{name}", event["id"]):
                    seen.append(event["payload"]["n"])

        consumer = Consumer(redis, [name], "g", handler, name="a")
        await consumer.ensure_groups()
        assert await consumer.poll_once(block_ms=100) == 4
        assert seen == [1, 2, 3, 4]
        assert all(isinstance(c["payload"], dict) for c in calls)  # one event per call
        assert [c["id"] for c in calls[:4]] == [*batch_ids(batch, 3), str(single)]
        assert [c["id"] for c in calls[4:]] == [c["id"] for c in calls[:4]]
        assert (await redis.xpending(name, "g"))["pending"] == 0

    async def test_a_failed_event_is_retried_before_the_events_after_it(self, redis):
        """The handler fails on the second event of a batch: the entry stays pending and
        its retry resumes at that event, so events are handled in order and the first
        one is not handed to the handler again."""
        name = stream()
        row = uuid.uuid4()
        await redis.xadd(
            name,
            signed_fields(
                "auth", str(row), "t", orjson.dumps([{"n": i} for i in range(4)]).decode()
            ),
        )
        calls: list[int] = []

        async def flaky(event):
            calls.append(event["payload"]["n"])
            if calls == [0, 1]:
                raise RuntimeError("database restarting")

        consumer = Consumer(redis, [name], "g", flaky, name="a", reclaim_idle_ms=600_000)
        await consumer.ensure_groups()
        assert await consumer.poll_once(block_ms=100) == 1
        assert calls == [0, 1]
        assert (await redis.xpending(name, "g"))["pending"] == 1
        assert await consumer.retry_own_pending() == 0
        assert calls == [0, 1, 1, 2, 3]
        assert (await redis.xpending(name, "g"))["pending"] == 0

    async def test_a_tampered_or_unsigned_batch_is_dropped_whole(self, redis):
        name = stream()
        seen: list[str] = []

        async def handler(event):
            seen.append(event["id"])

        row = uuid.uuid4()
        batch = orjson.dumps([{"user_id": "1", "delta_milli": -1000}, {"user_id": "2"}]).decode()
        good = signed_fields("auth", str(row), "credits.changed", batch)
        tampered = dict(good, payload=batch.replace("-1000", "1000000"))
        extended = dict(good, payload=batch[:-1] + ', {"user_id": "3"}]')
        unsigned = {k: v for k, v in good.items() if k not in ("sig", "issuer")}
        foreign = signed_fields("workspace", str(uuid.uuid4()), "credits.changed", batch)
        # A batch's signature lent to a single-event reading of it (its id changed).
        relabelled = dict(good, id=str(uuid.uuid4()))
        for fields in (tampered, extended, unsigned, foreign, relabelled, good):
            await redis.xadd(name, fields)
        consumer = Consumer(redis, [name], "g", handler, name="a")
        await consumer.ensure_groups()
        assert await consumer.poll_once(block_ms=100) == 6
        assert seen == batch_ids(row, 2)
        assert (await redis.xpending(name, "g"))["pending"] == 0  # dropped, not redelivered

    async def test_a_skipping_consumer_acks_a_batch_of_other_topics_unread(self, redis):
        name = stream()
        seen: list[str] = []

        async def handler(event):
            seen.append(event["id"])

        payload = orjson.dumps([{"n": 1}, {"n": 2}]).decode()
        await redis.xadd(name, signed_fields("auth", str(uuid.uuid4()), "credits.changed", payload))
        await redis.xadd(name, signed_fields("auth", "evt-sub", "subscription.changed", "{}"))
        consumer = Consumer(redis, [name], "g", handler, name="a", topics={"subscription.changed"})
        await consumer.ensure_groups()
        assert await consumer.poll_once(block_ms=100) == 2
        assert seen == ["evt-sub"]
        assert (await redis.xpending(name, "g"))["pending"] == 0
