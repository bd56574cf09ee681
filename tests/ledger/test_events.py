from __future__ import annotations

import asyncio
import os
import uuid

from redis.asyncio import Redis

from services.kit.outbox import decode_events
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
                    # An entry may be a batch's (its events in an array): decode_events.
                    for event in decode_events(fields):
                        if event["payload"].get("transaction_id") == tx:
                            found = (event["topic"], event["payload"])
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
    array of them); the relay publishes the row as ONE signed entry, which readers
    unpack (`decode_events`) into one event per debit, each with its own id."""

    async def test_a_batch_is_one_signed_entry_of_its_events(self, ledger, funded_user):
        from services.kit.outbox import decode_events, event_issuer

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
        entry: dict[bytes, bytes] | None = None
        try:
            for _ in range(60):
                for _, fields in await redis.xrevrange(stream, count=500):
                    events = decode_events(fields)
                    if any(e["payload"].get("transaction_id") in txs for e in events):
                        entry = fields
                        break
                if entry is not None:
                    break
                await asyncio.sleep(0.05)
        finally:
            await redis.aclose()
        assert entry is not None, "the batch's events were not relayed"
        assert event_issuer(entry) == "ledger"
        assert entry[b"topic"] == b"credits.changed"
        events = decode_events(entry)
        assert {e["payload"]["transaction_id"] for e in events} == txs.keys()  # all six
        row = uuid.UUID(entry[b"id"].decode())
        assert [e["id"] for e in events] == [str(uuid.uuid5(row, str(i))) for i in range(6)]
        for event in events:
            payload = event["payload"]
            body = txs[payload["transaction_id"]]
            assert event["topic"] == "credits.changed"
            assert payload == {
                "user_id": body["user_id"],
                "available_milli": round(body["available"] * 1000),
                "held_milli": 0,
                "debt_milli": 0,
                "delta_milli": -round(body["amount"] * 1000),
                "reason": "debit",
                "app": "penora",
                "transaction_id": payload["transaction_id"],
            }
