"""Ledger throughput: debits/s through the HTTP API vs a raw Postgres baseline.

Self-contained: makes a scratch database on KU_DATABASE_URL's server (or the
embedded one), starts the ledger service (one uvicorn worker), loads it, stops it,
verifies the ledger and drops the database.

The raw baseline (same run, same Postgres) is the one the issue defines: a single
conditional `UPDATE bench_raw SET balance = balance - 1 WHERE id = $1 AND balance >= 1`
per transaction on one row, from 8 asyncpg connections. HTTP: 32 concurrent clients
posting 1 Ku debits (each with its own Idempotency-Key) to POST /v1/ledger/debits,
for one hot user and for many users; each debit is a full ledger operation (wallet
lock, grant draw, journal with postings, idempotency row, outbox event).

Printed: both rates with p50/p99 per case; the raw UPDATE spread over many rows too,
as a stricter reference; last line `ratio=<http/raw>`, the lower of the two HTTP cases
over the raw hot-row baseline. The load generator is a minimal HTTP/1.1 client so it
does not take the server's CPU on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
import orjson  # noqa: E402

from bench._common import (  # noqa: E402
    RawHTTPConnection,
    Result,
    ScratchDatabase,
    free_port,
    load,
    start_service,
    stop,
    use_principal_keys,
    wait_ready,
)
from services.kit.principal import Principal, outgoing_header  # noqa: E402

SECONDS = float(os.environ.get("KU_BENCH_SECONDS", "8"))
CLIENTS = 32
RAW_CONNECTIONS = 8
MANY_USERS = 2000


async def raw_case(dsn: str, name: str, ids: list[int]) -> Result:
    connections = [await asyncpg.connect(dsn) for _ in range(RAW_CONNECTIONS)]

    async def make(i: int):
        conn = connections[i]

        async def call() -> None:
            await conn.execute(
                "UPDATE bench_raw SET balance = balance - 1 WHERE id = $1 AND balance >= 1",
                ids[secrets.randbelow(len(ids))],
            )

        return call

    try:
        return await load(name, RAW_CONNECTIONS, SECONDS, make)
    finally:
        for conn in connections:
            await conn.close()


async def http_case(port: int, secret: str, name: str, users: list[str]) -> Result:
    principal = Principal(kind="app", app="bench", scopes=frozenset({"ledger:write"}))
    header: dict[str, Any] = {
        "value": outgoing_header(principal, audience="ledger"),
        "at": time.monotonic(),
    }
    failures = {"n": 0}
    connections: list[RawHTTPConnection] = []

    async def make(i: int):
        conn = RawHTTPConnection("127.0.0.1", port)
        await conn.connect()
        connections.append(conn)

        async def call() -> None:
            if time.monotonic() - header["at"] > 20:  # principal headers expire after 60 s
                header.update(
                    value=outgoing_header(principal, audience="ledger"), at=time.monotonic()
                )
            user = users[secrets.randbelow(len(users))]
            status, _ = await conn.request(
                "POST",
                "/v1/ledger/debits",
                orjson.dumps({"user_id": user, "amount": 1, "app": "bench"}),
                {"x-ku-principal": header["value"], "idempotency-key": uuid.uuid4().hex},
            )
            if status != 201:
                failures["n"] += 1

        return call

    try:
        result = await load(name, CLIENTS, SECONDS, make)
    finally:
        for conn in connections:
            await conn.close()
    if failures["n"]:
        raise RuntimeError(f"{name}: {failures['n']} debits did not succeed")
    return result


async def setup_users(url: str, secret: str, users: list[str], ku_each: int) -> None:
    admin = Principal(kind="app", app="bench", scopes=frozenset({"admin"}))
    async with aiohttp.ClientSession() as session:
        sem = asyncio.Semaphore(16)

        async def one(user: str) -> None:
            async with sem:
                h = {"x-ku-principal": outgoing_header(admin, audience="ledger")}
                async with session.post(
                    f"{url}/v1/ledger/accounts", json={"user_id": user, "welcome": False}, headers=h
                ) as r:
                    assert r.status in (200, 201), await r.text()
                async with session.post(
                    f"{url}/v1/ledger/grants",
                    json={"user_id": user, "amount": ku_each, "source": "promo"},
                    headers={**h, "idempotency-key": uuid.uuid4().hex},
                ) as r:
                    assert r.status == 201, await r.text()

        await asyncio.gather(*(one(u) for u in users))


async def main() -> None:
    started = time.monotonic()
    async with ScratchDatabase() as db:
        conn = await asyncpg.connect(db.dsn)
        await conn.execute(
            "CREATE TABLE bench_raw (id int PRIMARY KEY, balance bigint NOT NULL);"
            f" INSERT INTO bench_raw SELECT g, 1000000000 FROM generate_series(1, {MANY_USERS}) g"
        )
        await conn.close()

        keys = use_principal_keys()
        secret = ""  # principals are signed with the keys above
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_service(
            "services.ledger.app",
            port,
            {
                "KU_DATABASE_URL": db.url,
                **keys,
                "KU_BUS_PREFIX": f"kubench{secrets.token_hex(3)}",
                "KU_LOG_LEVEL": "WARNING",
            },
        )
        try:
            await wait_ready(url, proc)
            hot = ["bench-hot"]
            many = [f"bench-{i}" for i in range(MANY_USERS)]
            await setup_users(url, secret, hot, 1_000_000_000)
            await setup_users(url, secret, many, 1_000_000)
            print(
                f"setup done in {time.monotonic() - started:.1f}s; {SECONDS:.0f}s per case, "
                f"{CLIENTS} HTTP clients, {RAW_CONNECTIONS} raw connections",
                flush=True,
            )

            raw_hot = await raw_case(db.dsn, "raw hot row", [1])
            print(raw_hot.line(), flush=True)
            http_hot = await http_case(port, secret, "http debit, hot user", hot)
            print(http_hot.line(), flush=True)
            raw_many = await raw_case(db.dsn, "raw many rows", list(range(1, MANY_USERS + 1)))
            print(raw_many.line(), flush=True)
            http_many = await http_case(port, secret, "http debit, many users", many)
            print(http_many.line(), flush=True)
        finally:
            stop(proc)

        from services.ledger.verify import verify

        problems = await verify(db.dsn)
        print(f"ledger verify after load: {'ok' if not problems else problems}")
        hot_ratio = http_hot.rate / raw_hot.rate
        many_ratio = http_many.rate / raw_hot.rate
        print(
            f"vs the raw baseline (hot row): hot user {hot_ratio:.2f}, many users {many_ratio:.2f}"
        )
        print(
            f"for information, many users vs raw many rows (no lock contention at all): "
            f"{http_many.rate / raw_many.rate:.2f}   (total {time.monotonic() - started:.0f}s)"
        )
        print(f"ratio={min(hot_ratio, many_ratio):.2f}")


if __name__ == "__main__":
    asyncio.run(main())
