from __future__ import annotations

import asyncio
import os

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
