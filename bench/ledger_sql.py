"""What one debit costs inside Postgres: rows and index entries written, WAL bytes,
and where `ledger.apply_batch` spends its time, per PL/pgSQL function.

Self-contained like bench/ledger.py: a scratch database on KU_DATABASE_URL's server,
2,000 users with one grant each (and one hot user), then ROUNDS batches of 100 debits
through `ledger.apply_batch` from ONE connection (no lock waits: this is the SQL's own
cost, not contention), for the many-users case and for the hot-user case.

A third case runs holds, one per `apply_batch` statement (as one client's hold runs),
over the 2,000 users; its rows are per hold.

Printed per case: the backend's CPU time per debit (Linux /proc; wall time and
debits/s too, which a busy machine inflates), rows inserted and
updated per debit per table (and how many updates were HOT, i.e. wrote no index
entry), index entries written per debit, and the functions' self time per debit
(`track_functions`). Counts are exact and do not depend on the machine's load; the
rates and times do.

    .venv/bin/python bench/ledger_sql.py
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncpg  # noqa: E402
import orjson  # noqa: E402
from alembic import command  # noqa: E402

from bench._common import ScratchDatabase, cpu_seconds  # noqa: E402
from bench.ledger import BENCH_AUTH, MANY_USERS, _direct_ops  # noqa: E402
from services.kit.migrations import alembic_config  # noqa: E402

ROUNDS = int(os.environ.get("KU_BENCH_SQL_ROUNDS", "60"))
BATCH = 100


async def _setup(conn: asyncpg.Connection, users: list[str], amount: int) -> None:
    for start in range(0, len(users), 200):
        ops = []
        for user in users[start : start + 200]:
            ops.append({"op": "open", "user_id": user, "amount": 0, "auth": BENCH_AUTH})
            ops.append(
                {
                    "op": "grant",
                    "user_id": user,
                    "amount": amount,
                    "source": "promo",
                    "app": "bench",
                    "auth": BENCH_AUTH,
                }
            )
        await conn.fetchval("SELECT ledger.apply_batch($1::json)::text", orjson.dumps(ops).decode())


_TABLES = """
SELECT s.relname, s.n_tup_ins, s.n_tup_upd, s.n_tup_hot_upd,
       (SELECT count(*) FROM pg_index i WHERE i.indrelid = s.relid) AS indexes
  FROM pg_stat_user_tables s WHERE s.schemaname = 'ledger'
"""
_FUNCTIONS = """
SELECT funcname, calls, self_time, total_time FROM pg_stat_user_functions
 WHERE schemaname = 'ledger'
"""


async def _snapshot(conn: asyncpg.Connection) -> tuple[dict, dict]:
    # The statistics collector's view is cached per transaction and sent at idle.
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    tables = {r["relname"]: dict(r) for r in await conn.fetch(_TABLES)}
    functions = {r["funcname"]: dict(r) for r in await conn.fetch(_FUNCTIONS)}
    return tables, functions


class Variant:
    """One scratch database with its users, and its counters across the rounds run."""

    def __init__(self, label: str, db: ScratchDatabase) -> None:
        self.label = label
        self.db = db
        self.seconds = 0.0
        self.cpu = 0.0
        self.debits = 0

    async def open(self) -> None:
        self.conn = await asyncpg.connect(self.db.dsn, server_settings={"track_functions": "all"})
        self.pid = await self.conn.fetchval("SELECT pg_backend_pid()")
        if not hasattr(self, "observer"):
            self.observer = await asyncpg.connect(self.db.dsn)

    async def rounds(self, users: list[str], n: int, holds: bool = False) -> None:
        """`n` rounds: a batch of BATCH debits each, or (`holds`) BATCH holds, each its
        own `apply_batch` statement and commit, as one client's hold is."""
        for _ in range(n):
            payloads = _hold_ops(users) if holds else [_direct_ops(users)]
            cpu = cpu_seconds(self.pid)
            started = time.perf_counter()
            raws = [
                await self.conn.fetchval("SELECT ledger.apply_batch($1::json)::text", payload)
                for payload in payloads
            ]
            self.seconds += time.perf_counter() - started
            self.cpu += cpu_seconds(self.pid) - cpu
            self.debits += BATCH
            bad = [r for raw in raws for r in orjson.loads(raw) if r["status"] != 201]
            if bad:
                raise RuntimeError(f"{self.label}: {bad[0]}")


def _hold_ops(users: list[str]) -> list[str]:
    """BATCH one-hold statements (TTL an hour: none expires during the run)."""
    return [
        orjson.dumps(
            [
                {
                    "op": "reserve",
                    "user_id": users[secrets.randbelow(len(users))],
                    "amount": 1000,
                    "app": "bench",
                    "ttl_seconds": 3600,
                    "reference": None,
                    "description": None,
                    "auth": BENCH_AUTH,
                    "key": uuid.uuid4().hex,
                    "scope": "app:bench",
                    "hash": uuid.uuid4().hex,
                }
            ]
        ).decode()
        for _ in range(BATCH)
    ]


async def case(variants: list[Variant], name: str, users: list[str], holds: bool = False) -> None:
    for v in variants:
        await v.open()
        await v.rounds(users, 3, holds)  # warm the plan caches and the buffers
        # Statistics for the rows the warm-up wrote (the holds table starts empty): a
        # plan made for an empty table scans it whole once it is not.
        await v.conn.execute("ANALYZE")
        # Statistics reach the collector when a session closes (or idles 10 s): the
        # warm-up's go with this connection, the measured rounds run on a fresh one.
        await v.conn.close()
        await v.open()
        v.seconds, v.debits = 0.0, 0
    await asyncio.sleep(0.5)
    before = [await _snapshot(v.observer) for v in variants]
    # Interleaved, so a neighbour's load on the machine falls on every variant alike.
    for _ in range(ROUNDS // 5):
        for v in variants:
            await v.rounds(users, 5, holds)
    for v in variants:
        await v.conn.close()  # flushes its function statistics
    await asyncio.sleep(1.2)
    after = [await _snapshot(v.observer) for v in variants]
    for v in variants:
        await v.observer.close()
        del v.observer
    print(f"\n== {name}")
    for v, b, a in zip(variants, before, after, strict=True):
        _report(v, b, a)


def _report(v: Variant, before: tuple, after: tuple) -> None:
    n = v.debits
    print(
        f"-- {v.label}: {v.cpu / n * 1e6:.0f} us of backend CPU per debit; wall "
        f"{v.seconds / n * 1e6:.0f} us per debit ({n / v.seconds:,.0f} debits/s on one connection)"
    )
    print(
        f"   {'table':<18}{'ins/debit':>10}{'upd/debit':>10}{'of which HOT':>13}"
        f"{'indexes':>8}{'index entries/debit':>21}"
    )
    total_entries = 0.0
    for table, row in sorted(after[0].items()):
        old = before[0].get(table, {"n_tup_ins": 0, "n_tup_upd": 0, "n_tup_hot_upd": 0})
        ins = (row["n_tup_ins"] - old["n_tup_ins"]) / n
        upd = (row["n_tup_upd"] - old["n_tup_upd"]) / n
        hot = (row["n_tup_hot_upd"] - old["n_tup_hot_upd"]) / n
        if not (ins or upd):
            continue
        entries = (ins + upd - hot) * row["indexes"]
        total_entries += entries
        print(
            f"   {table:<18}{ins:>10.2f}{upd:>10.2f}{hot:>13.2f}{row['indexes']:>8}{entries:>21.2f}"
        )
    print(
        f"   {'index entries written per debit (partial indexes counted as written)':<59}"
        f"{total_entries:>21.2f}"
    )
    print(f"   {'function':<22}{'calls/debit':>12}{'self us/debit':>15}{'total us/debit':>16}")
    for func, row in sorted(after[1].items(), key=lambda kv: -kv[1]["self_time"]):
        old = before[1].get(func, {"calls": 0, "self_time": 0.0, "total_time": 0.0})
        calls = (row["calls"] - old["calls"]) / n
        if not calls:
            continue
        self_us = (row["self_time"] - old["self_time"]) * 1000 / n
        total_us = (row["total_time"] - old["total_time"]) * 1000 / n
        print(f"   {func:<22}{calls:>12.2f}{self_us:>15.1f}{total_us:>16.1f}")


async def _prepare(label: str, revision: str, extra: str | None) -> Variant:
    db = ScratchDatabase()
    await db.__aenter__()
    if revision != "head":
        await asyncio.to_thread(command.downgrade, alembic_config("ledger", db.url), revision)
    conn = await asyncpg.connect(db.dsn)
    if extra:
        await conn.execute(await asyncio.to_thread(Path(extra).read_text))
    await _setup(conn, [f"bench-{i}" for i in range(MANY_USERS)], 1_000_000_000)
    await _setup(conn, ["bench-hot"], 1_000_000_000_000)
    await conn.close()
    return Variant(label, db)


async def main() -> None:
    """Arguments: `REVISION[+file.sql]` per variant (default: `head`); e.g.
    `0004 head` compares the ledger at migration 0004 with the tree's newest."""
    specs = sys.argv[1:] or ["head"]
    variants = []
    try:
        for spec in specs:
            revision, _, extra = spec.partition("+")
            variants.append(await _prepare(spec, revision, extra or None))
        many = [f"bench-{i}" for i in range(MANY_USERS)]
        await case(variants, f"{BATCH} debits over {MANY_USERS} users", many)
        await case(variants, f"{BATCH} debits of one hot user", ["bench-hot"])
        if os.environ.get("KU_BENCH_SQL_HOLDS", "1") == "1":
            await case(variants, "holds, one per statement (its commit included)", many, True)
    finally:
        for v in variants:
            await v.db.__aexit__(None, None, None)


if __name__ == "__main__":
    asyncio.run(main())
