"""Ledger throughput: debits/s through the HTTP API vs raw Postgres and the ledger's own SQL.

Self-contained: makes a scratch database on KU_DATABASE_URL's server (or the
embedded one), starts the ledger service (KU_LEDGER_PROCESSES processes, `ku up`'s
setting; 1 unless set, as there), loads it, stops it,
verifies the ledger and drops the database.

The raw baseline (same run, same Postgres) is the one the issue defines: a single
conditional `UPDATE bench_raw SET balance = balance - 1 WHERE id = $1 AND balance >= 1`
per transaction on one row, from 8 asyncpg connections. HTTP: 32 concurrent clients
posting 1 Ku debits (each with its own Idempotency-Key) to POST /v1/ledger/debits,
for one hot user and for many users; each debit is a full ledger operation (wallet
lock, grant draw, journal with postings, idempotency row, outbox event).

The second baseline is the ledger's own SQL ceiling: `ledger.apply_batch` called
directly over asyncpg from DIRECT_CONNECTIONS connections, each call 100 debits of
random users out of 2,000 (sorted by user, with the `auth` object and idempotency
fields the service sends). The HTTP batch case posts the same 100 debits to
POST /v1/ledger/batch from BATCH_CLIENTS clients. "http balance, many users": 32 clients
reading GET /v1/ledger/balance (no bar; the read route's ledger CPU per request).

Printed: every rate with p50/p99 per case (per call: a batch's latency for the batch
cases); for the HTTP debit cases the ledger processes' CPU per debit and that of their
Postgres backends (/proc, so only with the server on this machine; its WAL writer and
other background processes are not counted); `ledger verify` after the load, the four
ratios of issue 13 against their bars:

    HTTP batch / direct SQL batch               >= 0.8
    HTTP single debits, hot user / raw hot row  >= 0.8
    HTTP single debits, many users / direct SQL batch  >= 0.5
    direct SQL batch / raw UPDATE over many rows       >= 0.5

the p99 of single debits (bar: 50 ms), and last line `ratio=` the lowest ratio divided
by its bar (>= 1.0: all met). The load generator is a minimal HTTP/1.1 client so it
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

ROOT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, ROOT)

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
import orjson  # noqa: E402

from bench._common import (  # noqa: E402
    MachineBusy,
    RawHTTPConnection,
    Result,
    ScratchDatabase,
    cpu_seconds,
    load,
    start_service,
    stop,
    use_principal_keys,
    wait_ready,
)
from services.kit.principal import Principal, SignedPrincipal, outgoing_header  # noqa: E402
from services.kit.runner import free_port  # noqa: E402

SECONDS = float(os.environ.get("KU_BENCH_SECONDS", "8"))
CLIENTS = 32
RAW_CONNECTIONS = 8
MANY_USERS = 2000
BATCH = 100
DIRECT_CONNECTIONS = int(os.environ.get("KU_BENCH_DIRECT_CONNECTIONS", "6"))
BATCH_CLIENTS = int(os.environ.get("KU_BENCH_BATCH_CLIENTS", "8"))
# The ledger's processes (`ku up`'s setting, default 1 there too). On the 2-core machine
# the issue measures on, one process batches best: two split the 32 connections
# between them, each batch then holds about half as many debits and Postgres's cost
# is mostly per statement (docs/ledger.md, "Stop 14"). KU_LEDGER_PROCESSES=2 runs two.
PROCESSES = int(os.environ.get("KU_LEDGER_PROCESSES", "1"))
BENCH_AUTH = {"user": "any", "owner": "app:bench", "holds": "*", "charges": "*"}


class ServiceCPU:
    """The ledger process's CPU per debit over a case: from before its first request
    until the outbox relay has published the case's last event (so the relay's work,
    signing every event, is counted), divided by every debit the case committed
    (warm-up included: the CPU is too)."""

    def __init__(self, dsn: str, pid: int, stream: str) -> None:
        self.dsn = dsn
        self.pid = pid
        self.stream = stream  # the ledger's event stream: entries the relay wrote

    async def _entries(self) -> int:
        from redis.asyncio import Redis

        redis = Redis.from_url(os.environ.get("KU_REDIS_URL", "redis://127.0.0.1:6379/0"))
        try:
            return int(await redis.xlen(self.stream))
        finally:
            await redis.aclose()

    async def _debits(self, conn: asyncpg.Connection) -> int:
        return await conn.fetchval("SELECT count(*) FROM ledger.transactions WHERE kind = 'debit'")

    @staticmethod
    async def _backends(conn: asyncpg.Connection) -> dict[int, float]:
        """CPU seconds so far of every other Postgres backend on the bench's database
        (the committer's, the reads', the relay's connections): the ledger's SQL."""
        pids = await conn.fetch(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return {r["pid"]: cpu_seconds(r["pid"]) for r in pids}

    async def start(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            self.debits = await self._debits(conn)
            self.backends = await self._backends(conn)
        finally:
            await conn.close()
        self.entries = await self._entries()
        self.cpu = cpu_seconds(self.pid)

    async def stop(self) -> str:
        conn = await asyncpg.connect(self.dsn)
        try:
            for _ in range(300):
                if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM ledger.outbox)"):
                    break
                await asyncio.sleep(0.1)
            cpu = cpu_seconds(self.pid) - self.cpu
            debits = await self._debits(conn) - self.debits
            # A backend opened during the case counts whole; one closed during it is
            # missed (the ledger's pools keep theirs open).
            sql = sum(
                now - self.backends.get(pid, 0.0)
                for pid, now in (await self._backends(conn)).items()
            )
        finally:
            await conn.close()
        per_debit = cpu / max(debits, 1) * 1e6
        entries = await self._entries() - self.entries
        return (
            f"ledger CPU {per_debit:6.0f} us per debit (all processes, relay included),"
            f" its Postgres backends {sql / max(debits, 1) * 1e6:6.0f} us;"
            f" relay: {debits / max(entries, 1):5.1f} events per stream entry"
        )


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


def _direct_ops(users: list[str]) -> str:
    """100 debits as the service sends them to `ledger.apply_batch`, sorted by user."""
    chosen = sorted(users[secrets.randbelow(len(users))] for _ in range(BATCH))
    return orjson.dumps(
        [
            {
                "op": "debit",
                "user_id": user,
                "amount": 1000,
                "app": "bench",
                "description": None,
                "reference": None,
                "auth": BENCH_AUTH,
                "key": uuid.uuid4().hex,
                "scope": "app:bench",
                "hash": uuid.uuid4().hex,
            }
            for user in chosen
        ]
    ).decode()


async def direct_batch_case(dsn: str, name: str, users: list[str]) -> Result:
    connections = [await asyncpg.connect(dsn) for _ in range(DIRECT_CONNECTIONS)]
    failures = {"n": 0}

    async def make(i: int):
        conn = connections[i]

        async def call() -> None:
            raw = await conn.fetchval(
                "SELECT ledger.apply_batch($1::json)::text", _direct_ops(users)
            )
            failures["n"] += sum(1 for r in orjson.loads(raw) if r["status"] != 201)

        return call

    try:
        result = await load(name, DIRECT_CONNECTIONS, SECONDS, make)
    finally:
        for conn in connections:
            await conn.close()
    if failures["n"]:
        raise RuntimeError(f"{name}: {failures['n']} debits did not succeed")
    return Result(name, result.count * BATCH, result.seconds, result.latencies)


async def http_batch_case(port: int, name: str, users: list[str]) -> Result:
    principal = Principal(kind="app", app="bench", scopes=frozenset({"ledger:write", "users:any"}))
    signed = SignedPrincipal(principal)  # re-signed every 20 s: headers expire after 60 s
    failures = {"n": 0}
    connections: list[RawHTTPConnection] = []

    async def make(i: int):
        conn = RawHTTPConnection("127.0.0.1", port)
        await conn.connect()
        connections.append(conn)

        async def call() -> None:
            items = [
                {
                    "op": "debit",
                    "idempotency_key": uuid.uuid4().hex,
                    "user_id": users[secrets.randbelow(len(users))],
                    "amount": 1,
                }
                for _ in range(BATCH)
            ]
            status, body = await conn.request(
                "POST",
                "/v1/ledger/batch",
                orjson.dumps({"operations": items}),
                {"x-ku-principal": signed.header_for("ledger")},
            )
            if status != 200:
                failures["n"] += BATCH
            else:
                failures["n"] += orjson.loads(body)["failed"]

        return call

    try:
        result = await load(name, BATCH_CLIENTS, SECONDS, make)
    finally:
        for conn in connections:
            await conn.close()
    if failures["n"]:
        raise RuntimeError(f"{name}: {failures['n']} debits did not succeed")
    return Result(name, result.count * BATCH, result.seconds, result.latencies)


async def http_balance_case(port: int, name: str, users: list[str], pid: int) -> Result:
    """Balance reads (`GET /v1/ledger/balance`), CLIENTS at once: the read route's
    per-request cost, printed as ledger process CPU per read."""
    principal = Principal(kind="app", app="bench", scopes=frozenset({"ledger:read", "users:any"}))
    value = outgoing_header(principal, audience="ledger")
    connections: list[RawHTTPConnection] = []

    async def make(i: int):
        conn = RawHTTPConnection("127.0.0.1", port)
        await conn.connect()
        connections.append(conn)

        async def call() -> None:
            user = users[secrets.randbelow(len(users))]
            status, _ = await conn.request(
                "GET", f"/v1/ledger/balance?user_id={user}", b"", {"x-ku-principal": value}
            )
            if status != 200:
                raise RuntimeError(f"{name}: balance answered {status}")

        return call

    cpu = cpu_seconds(pid)
    try:
        result = await load(name, CLIENTS, SECONDS, make)
    finally:
        for conn in connections:
            await conn.close()
    cpu = cpu_seconds(pid) - cpu
    print(result.line(), flush=True)
    print(f"    ledger CPU {cpu / max(result.count, 1) * 1e6:6.0f} us per read", flush=True)
    return result


async def http_case(port: int, secret: str, name: str, users: list[str]) -> Result:
    principal = Principal(kind="app", app="bench", scopes=frozenset({"ledger:write", "users:any"}))
    signed = SignedPrincipal(principal)  # re-signed every 20 s: headers expire after 60 s
    failures = {"n": 0}
    connections: list[RawHTTPConnection] = []

    async def make(i: int):
        conn = RawHTTPConnection("127.0.0.1", port)
        await conn.connect()
        connections.append(conn)

        async def call() -> None:
            user = users[secrets.randbelow(len(users))]
            status, _ = await conn.request(
                "POST",
                "/v1/ledger/debits",
                orjson.dumps({"user_id": user, "amount": 1, "app": "bench"}),
                {
                    "x-ku-principal": signed.header_for("ledger"),
                    "idempotency-key": uuid.uuid4().hex,
                },
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


async def floor_case() -> Result:
    """The same client and request against bench/_floor.py's bare ASGI app, served as the
    ledger is: what no Python service on this machine answers faster."""
    port = free_port()
    proc = start_service("bench._floor", port, {"PYTHONPATH": ROOT}, processes=PROCESSES)
    try:
        await wait_ready(f"http://127.0.0.1:{port}", proc)
        return await http_case(port, "", "floor: bare ASGI answer", ["bench-hot"])
    finally:
        stop(proc)


async def one_client_holds(port: int, dsn: str, user: str, n: int = 200) -> dict[str, Result]:
    """Latency at ONE client, the generation service's case (a hold is on every
    generation's time-to-first-token path): a hold and its release through HTTP, the same
    hold as one `apply_batch` statement over asyncpg, and a bare one-row UPDATE commit
    (the database's durable-commit floor). Interleaved, so the machine's load falls on
    each alike; p50 of the hold only."""
    principal = Principal(kind="app", app="bench", scopes=frozenset({"ledger:write", "users:any"}))
    conn = RawHTTPConnection("127.0.0.1", port)
    await conn.connect()
    db = await asyncpg.connect(dsn)
    lat: dict[str, list[float]] = {
        "http hold, 1 client": [],
        "direct hold, 1 conn": [],
        "raw commit, 1 conn": [],
    }
    try:
        for _ in range(n):
            headers = {
                "x-ku-principal": outgoing_header(principal, audience="ledger"),
                "idempotency-key": uuid.uuid4().hex,
            }
            t0 = time.perf_counter()
            status, body = await conn.request(
                "POST",
                "/v1/ledger/holds",
                orjson.dumps({"user_id": user, "amount": 1, "app": "bench", "ttl_seconds": 60}),
                headers,
            )
            lat["http hold, 1 client"].append(time.perf_counter() - t0)
            if status != 201:
                raise RuntimeError(f"hold: {status} {body[:200]!r}")
            hold = orjson.loads(body)["hold"]["id"]
            await conn.request(
                "POST",
                f"/v1/ledger/holds/{hold}/release",
                b"",
                {"x-ku-principal": headers["x-ku-principal"]},
            )
            op = {
                "op": "reserve",
                "user_id": user,
                "amount": 1000,
                "app": "bench",
                "ttl_seconds": 60,
                "reference": None,
                "description": None,
                "auth": BENCH_AUTH,
                "key": uuid.uuid4().hex,
                "scope": "app:bench",
                "hash": uuid.uuid4().hex,
            }
            t0 = time.perf_counter()
            await db.fetchval(
                "SELECT ledger.apply_batch($1::json)::text", orjson.dumps([op]).decode()
            )
            lat["direct hold, 1 conn"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await db.execute(
                "UPDATE bench_raw SET balance = balance - 1 WHERE id = 1 AND balance >= 1"
            )
            lat["raw commit, 1 conn"].append(time.perf_counter() - t0)
    finally:
        await conn.close()
        await db.close()
    return {name: Result(name, len(xs), sum(xs), xs) for name, xs in lat.items()}


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
                    json={"user_id": user, "amount": ku_each, "source": "promo", "reason": "bench"},
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
        bus_prefix = db.bus_prefix
        proc = start_service(
            "services.ledger.app",
            port,
            {
                "KU_DATABASE_URL": db.url,
                **keys,
                "KU_BUS_PREFIX": bus_prefix,
                "KU_LOG_LEVEL": "WARNING",
            },
            processes=PROCESSES,
        )
        try:
            await wait_ready(url, proc)
            cpu = ServiceCPU(db.dsn, proc.pid, f"{bus_prefix}.events.ledger")
            hot = ["bench-hot"]
            many = [f"bench-{i}" for i in range(MANY_USERS)]
            await setup_users(url, secret, hot, 1_000_000_000)
            await setup_users(url, secret, many, 1_000_000)
            print(
                f"setup done in {time.monotonic() - started:.1f}s; {SECONDS:.0f}s per case, "
                f"{CLIENTS} HTTP clients, {RAW_CONNECTIONS} raw connections, "
                f"{PROCESSES} ledger process{'es' if PROCESSES > 1 else ''}",
                flush=True,
            )

            raw_hot = await raw_case(db.dsn, "raw hot row", [1])
            print(raw_hot.line(), flush=True)
            await cpu.start()
            with MachineBusy() as busy:
                http_hot = await http_case(port, secret, "http debit, hot user", hot)
            print(http_hot.line(), flush=True)
            print("    " + await cpu.stop() + busy.line(), flush=True)
            floor = await floor_case()
            print(floor.line(), flush=True)
            raw_many = await raw_case(db.dsn, "raw many rows", list(range(1, MANY_USERS + 1)))
            print(raw_many.line(), flush=True)
            await cpu.start()
            with MachineBusy() as busy:
                http_many = await http_case(port, secret, "http debit, many users", many)
            print(http_many.line(), flush=True)
            print("    " + await cpu.stop() + busy.line(), flush=True)
            direct = await direct_batch_case(db.dsn, f"direct apply_batch x{BATCH}", many)
            print(direct.line(), flush=True)
            await cpu.start()
            http_batch = await http_batch_case(port, f"http batch x{BATCH}", many)
            print(http_batch.line(), flush=True)
            print("    " + await cpu.stop(), flush=True)
            await http_balance_case(port, "http balance, many users", many, proc.pid)
            single = await one_client_holds(port, db.dsn, many[0])
            for result in single.values():
                print(result.line(), flush=True)
        finally:
            stop(proc)

        from services.ledger.verify import verify

        problems = await verify(db.dsn)
        print(f"ledger verify after load: {'ok' if not problems else problems}")
        ratios = [
            ("http batch / direct batch", http_batch.rate / direct.rate, 0.8),
            ("single hot user / raw hot row", http_hot.rate / raw_hot.rate, 0.8),
            ("single many users / direct batch", http_many.rate / direct.rate, 0.5),
            ("direct batch / raw many rows", direct.rate / raw_many.rate, 0.5),
        ]
        for label, value, bar in ratios:
            print(f"{label:<34} {value:5.2f}  (bar {bar})  {'ok' if value >= bar else 'BELOW'}")
        print(
            f"the floor (a bare ASGI answer, same server and client) is {floor.rate:.0f}/s:"
            f" the hot-user bar asks {0.8 * raw_hot.rate:.0f}/s"
            f" ({0.8 * raw_hot.rate / floor.rate:.2f} of the floor)"
        )
        added = single["http hold, 1 client"].pct(0.5) - single["direct hold, 1 conn"].pct(0.5)
        print(f"hold at 1 client: the service adds p50 {added:.2f} ms to its SQL statement")
        p99 = max(http_hot.pct(0.99), http_many.pct(0.99))
        print(f"p99 of single debits: {p99:.1f} ms  (bar 50 ms)  {'ok' if p99 < 50 else 'ABOVE'}")
        print(f"(total {time.monotonic() - started:.0f}s)")
        if problems:
            print("ratio=0.00  (ledger verify failed)")
            return
        print(f"ratio={min(value / bar for _, value, bar in ratios):.2f}")


if __name__ == "__main__":
    asyncio.run(main())
