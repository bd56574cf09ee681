"""Two ledger processes (real uvicorn processes, each with its own group committer
and connection pool) racing on the same wallets: concurrency is decided by
Postgres's row locks, not by one process's batching."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from services.kit.db import plain_url
from services.kit.runner import free_port
from services.ledger.verify import verify
from tests.ledger.helpers import key, operator, penora


@pytest.fixture(scope="module")
def two_ledgers(ku_database_url: str) -> Iterator[list[str]]:
    procs, urls = [], []
    for _ in range(2):
        port = free_port()
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "services.ledger.app:create_app",
                    "--factory",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--no-access-log",
                ],  # fmt: skip
                env=dict(os.environ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        urls.append(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        for url, proc in zip(urls, procs, strict=True):
            while True:
                assert proc.poll() is None, "a ledger process exited at startup"
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "ledger process did not start"
                time.sleep(0.2)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=20)


async def _funded(client: httpx.AsyncClient, base: str, amount: int) -> str:
    user = f"race-{uuid.uuid4().hex[:10]}"
    r = await client.post(
        f"{base}/v1/ledger/accounts", json={"user_id": user, "welcome": False}, headers=operator()
    )
    assert r.status_code == 201, r.text
    r = await client.post(
        f"{base}/v1/ledger/grants",
        json={"user_id": user, "amount": amount, "source": "promo"},
        headers={**operator(), **key()},
    )
    assert r.status_code == 201, r.text
    return user


async def test_200_debits_across_two_processes_against_50_ku(two_ledgers, ku_database_url):
    async with httpx.AsyncClient(timeout=60) as client:
        user = await _funded(client, two_ledgers[0], 50)

        async def one(i: int) -> int:
            r = await client.post(
                f"{two_ledgers[i % 2]}/v1/ledger/debits",
                json={"user_id": user, "amount": 1},
                headers={**penora(), **key()},
            )
            return r.status_code

        statuses = await asyncio.gather(*(one(i) for i in range(200)))
        assert statuses.count(201) == 50
        assert statuses.count(402) == 150
        r = await client.get(
            f"{two_ledgers[1]}/v1/ledger/balance", params={"user_id": user}, headers=operator()
        )
        assert r.json()["available"] == 0
    assert await verify(plain_url(ku_database_url)) == []


async def test_capture_vs_release_one_winner_per_hold(two_ledgers, ku_database_url):
    async with httpx.AsyncClient(timeout=60) as client:
        user = await _funded(client, two_ledgers[0], 200)
        holds = []
        for _ in range(100):
            r = await client.post(
                f"{two_ledgers[0]}/v1/ledger/holds",
                json={"user_id": user, "amount": 1},
                headers={**penora(), **key()},
            )
            assert r.status_code == 201, r.text
            holds.append(r.json()["hold"]["id"])

        async def race(i: int, hold: str) -> tuple[int, int]:
            capture, release = await asyncio.gather(
                client.post(
                    f"{two_ledgers[i % 2]}/v1/ledger/holds/{hold}/capture", headers=penora()
                ),
                client.post(
                    f"{two_ledgers[(i + 1) % 2]}/v1/ledger/holds/{hold}/release",
                    headers=penora(),
                ),
            )
            return capture.status_code, release.status_code

        outcomes = await asyncio.gather(*(race(i, h) for i, h in enumerate(holds)))
        assert all(sorted(o) == [200, 409] for o in outcomes), outcomes
        captured = sum(1 for c, _ in outcomes if c == 200)
        r = await client.get(
            f"{two_ledgers[1]}/v1/ledger/balance", params={"user_id": user}, headers=operator()
        )
        assert (r.json()["available"], r.json()["held"]) == (200 - captured, 0)
    assert await verify(plain_url(ku_database_url)) == []
