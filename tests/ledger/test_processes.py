"""`KU_LEDGER_PROCESSES=2`: the suite runs the ledger as two uvicorn worker processes on
one port; both answer, and debits racing across them stay exact."""

from __future__ import annotations

import asyncio
import os
import uuid

import httpx
import pytest

from services.kit.db import plain_url
from services.kit.runner import Suite, SuiteError
from services.kit.testing.plugin import wait_for_workers
from services.ledger.verify import verify
from tests.ledger.helpers import key, operator, penora

pytestmark = pytest.mark.e2e


def test_a_bad_process_count_is_refused() -> None:
    for bad in ("two", "0"):
        env = {**os.environ, "KU_LEDGER_PROCESSES": bad}
        with (
            pytest.raises(SuiteError, match="KU_LEDGER_PROCESSES"),
            Suite(env, only=["ledger"], free_ports=True, quiet=True, migrate=False),
        ):
            pass


async def test_two_ledger_processes_answer_and_debits_stay_exact(
    ku_database_url: str, new_user_id
) -> None:
    env = {**os.environ, "KU_LEDGER_PROCESSES": "2"}
    with Suite(env, only=["ledger"], free_ports=True, quiet=True) as suite:
        supervisor = suite.processes["ledger"].pid
        workers = await wait_for_workers(supervisor, 2)
        assert len(workers) == 2, workers

        url = suite.urls["ledger"]
        user = new_user_id()
        # Fresh connections per request, so the kernel spreads them over both workers.
        async with httpx.AsyncClient(
            base_url=url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)
        ) as client:
            r = await client.post(
                "/v1/ledger/accounts", json={"user_id": user, "welcome": False}, headers=operator()
            )
            assert r.status_code == 201, r.text
            r = await client.post(
                "/v1/ledger/grants",
                json={"user_id": user, "amount": 40, "source": "promo"},
                headers={**operator(), **key()},
            )
            assert r.status_code == 201, r.text

            async def debit() -> int:
                r = await client.post(
                    "/v1/ledger/debits",
                    json={"user_id": user, "amount": 1},
                    headers={**penora(), **key()},
                )
                return r.status_code

            codes = await asyncio.gather(*(debit() for _ in range(120)))
            assert codes.count(201) == 40 and codes.count(402) == 80

            same = {"Idempotency-Key": uuid.uuid4().hex}
            r = await client.get("/v1/ledger/balance", params={"user_id": user}, headers=operator())
            assert r.status_code == 200 and r.json()["available"] == 0
            replay = [
                await client.post(
                    "/v1/ledger/grants",
                    json={"user_id": user, "amount": 3, "source": "promo"},
                    headers={**operator(), **same},
                )
                for _ in range(4)
            ]
            assert [r.status_code for r in replay] == [201] * 4
            assert len({r.json()["transaction_id"] for r in replay}) == 1
            r = await client.get("/v1/ledger/balance", params={"user_id": user}, headers=operator())
            assert r.json()["available"] == 3
    assert await verify(plain_url(ku_database_url)) == []
