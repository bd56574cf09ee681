from __future__ import annotations

import asyncio
import os
import uuid

import orjson
from redis.asyncio import Redis

from tests.ledger.helpers import key, penora


class TestCreditsChanged:
    async def test_debit_publishes_credits_changed(self, ledger, funded_user):
        user = await funded_user(10)
        r = await ledger.post(
            "/v1/ledger/debits",
            json={"user_id": user, "amount": 4, "app": "penora"},
            headers={**penora(), **key()},
        )
        tx = r.json()["transaction_id"]
        redis = Redis.from_url(os.environ["KU_REDIS_URL"])
        stream = f"{os.environ['KU_BUS_PREFIX']}.events.ledger"
        try:
            found = None
            for _ in range(40):
                for _, fields in await redis.xrevrange(stream, count=200):
                    payload = orjson.loads(fields[b"payload"])
                    if payload.get("transaction_id") == tx:
                        found = (fields[b"topic"].decode(), payload)
                        break
                if found:
                    break
                await asyncio.sleep(0.05)
        finally:
            await redis.aclose()
        assert found is not None, "credits.changed was not relayed"
        topic, payload = found
        assert topic == "credits.changed"
        assert payload["user_id"] == user and payload["available_milli"] == 6000
        assert payload["delta_milli"] == -4000 and payload["app"] == "penora"


class TestOneOutboxRowPerBatch:
    """Since migration 0006 a batch's `credits.changed` events are one outbox row (the
    array of them); the relay publishes each as its own signed entry, as before."""

    async def test_each_debit_of_a_batch_is_its_own_signed_entry(self, ledger, funded_user):
        from services.kit.outbox import event_issuer

        users = [await funded_user(10) for _ in range(3)]
        items = [
            {"op": "debit", "idempotency_key": uuid.uuid4().hex, "user_id": u, "amount": n}
            for n, u in enumerate(users * 2, start=1)
        ]
        r = await ledger.post("/v1/ledger/batch", json={"operations": items}, headers=penora())
        assert r.status_code == 200, r.text
        txs = {res["body"]["transaction_id"]: res["body"] for res in r.json()["results"]}
        assert len(txs) == 6
        redis = Redis.from_url(os.environ["KU_REDIS_URL"])
        stream = f"{os.environ['KU_BUS_PREFIX']}.events.ledger"
        found: dict[int, dict[bytes, bytes]] = {}
        try:
            for _ in range(60):
                for _, fields in await redis.xrevrange(stream, count=500):
                    payload = orjson.loads(fields[b"payload"])
                    if payload.get("transaction_id") in txs:
                        found[payload["transaction_id"]] = fields
                if len(found) == len(txs):
                    break
                await asyncio.sleep(0.05)
        finally:
            await redis.aclose()
        assert found.keys() == txs.keys()
        assert len({fields[b"id"] for fields in found.values()}) == 6  # six events, six ids
        for tx, fields in found.items():
            assert event_issuer(fields) == "ledger"
            assert fields[b"topic"] == b"credits.changed"
            payload = orjson.loads(fields[b"payload"])
            body = txs[tx]
            assert payload == {
                "user_id": body["user_id"],
                "available_milli": round(body["available"] * 1000),
                "held_milli": 0,
                "debt_milli": 0,
                "delta_milli": -round(body["amount"] * 1000),
                "reason": "debit",
                "app": "penora",
                "transaction_id": tx,
            }


class TestRelayOfArrayRows:
    """The relay's side of one row per batch (services/kit/outbox.py), on its own schema:
    a row whose payload is an array is one entry per element, in order, each signed,
    each with an id derived from the row's; a claim stops at about `batch` events."""

    SCHEMA = "ledger_outbox_arrays_test"

    async def test_array_rows_are_one_entry_per_event(self, ku_database_url):
        import asyncpg
        from sqlalchemy import MetaData, text
        from sqlalchemy.ext.asyncio import create_async_engine

        from services.kit.db import async_url, plain_url
        from services.kit.outbox import OutboxRelay, event_issuer, outbox_table

        metadata = MetaData(schema=self.SCHEMA)
        outbox_table(metadata)
        engine = create_async_engine(async_url(ku_database_url))
        async with engine.begin() as c:
            await c.execute(text(f"CREATE SCHEMA IF NOT EXISTS {self.SCHEMA}"))
            await c.run_sync(metadata.create_all)
        await engine.dispose()

        rows = [uuid.uuid4() for _ in range(3)]
        payloads = [[{"n": 1}, {"n": 2}, {"n": 3}], [{"n": 4}, {"n": 5}, {"n": 6}], {"n": 7}]
        conn = await asyncpg.connect(plain_url(ku_database_url))
        redis = Redis.from_url(os.environ["KU_REDIS_URL"])
        stream = f"{os.environ['KU_BUS_PREFIX']}.{uuid.uuid4().hex[:8]}.events.ledger"
        try:
            await conn.execute(f"DELETE FROM {self.SCHEMA}.outbox")
            for i, (row, payload) in enumerate(zip(rows, payloads, strict=True)):
                await conn.execute(
                    f"INSERT INTO {self.SCHEMA}.outbox (id, topic, payload, created_at)"
                    " VALUES ($1, 'credits.changed', $2::jsonb, now() + $3 * interval '1 ms')",
                    row,
                    orjson.dumps(payload).decode(),
                    i,
                )
            relay = OutboxRelay(
                plain_url(ku_database_url), redis, self.SCHEMA, stream, issuer="ledger", batch=4
            )
            # The first claim reaches 4 events within its second row: 6 events, 2 rows.
            assert await relay.relay_once(conn) == 6
            assert await conn.fetchval(f"SELECT count(*) FROM {self.SCHEMA}.outbox") == 1
            assert await relay.relay_once(conn) == 1
            assert await relay.relay_once(conn) == 0
            entries = [fields for _, fields in await redis.xrange(stream)]
        finally:
            await redis.delete(stream)
            await redis.aclose()
            await conn.close()
        assert [orjson.loads(f[b"payload"])["n"] for f in entries] == [1, 2, 3, 4, 5, 6, 7]
        expected_ids = [str(uuid.uuid5(rows[r], str(i))) for r in (0, 1) for i in range(3)]
        assert [f[b"id"].decode() for f in entries] == [*expected_ids, str(rows[2])]
        assert all(event_issuer(f) == "ledger" for f in entries)
        assert all(f[b"topic"] == b"credits.changed" for f in entries)
