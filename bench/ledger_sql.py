"""What one ledger operation costs inside Postgres: rows and index entries written, WAL
bytes, and where `ledger.apply_batch` spends its time, per PL/pgSQL function.

Self-contained like bench/ledger.py: a scratch database on KU_DATABASE_URL's server,
2,000 users with one grant each (and one hot user), then ROUNDS batches of 100 debits
through `ledger.apply_batch` from ONE connection (no lock waits: this is the SQL's own
cost, not contention), for the many-users case, the hot-user case and 10 users (ten
debits each, as a few busy users' batches are), and debits one per statement (the
committer's batch when it has one operation).

Then the cases of a generation (`KU_BENCH_SQL_HOLDS=0` skips them), over the 2,000
users, rows and times per operation:
- holds, one per `apply_batch` statement (as one client's hold runs);
- captures (of 40 % of the hold) and releases, one per statement, of holds placed
  before the measured rounds;
- mixed batches of 16: 8 new holds and 8 captures of the previous batch's holds, sorted
  as the group committer sends them (as 64 generation streams make them: such a batch
  takes the advance wallet locks of migration 0007).

Printed per case: the backend's CPU time per operation (/proc), wall time and rate
(which a busy machine inflates), rows inserted and updated per operation per table (and
how many updates were HOT, i.e. wrote no index entry), index entries written per
operation, and the functions' self time per operation (`track_functions`). Counts are
exact and do not depend on the machine's load; the rates and times do. Several
variants (revisions) run interleaved, round by round, so the machine's load falls on
each alike:

    .venv/bin/python bench/ledger_sql.py 0007 head
"""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
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
LATENCY_HOLDS = int(os.environ.get("KU_BENCH_SQL_LATENCY_HOLDS", "400"))


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
        self.pending: list[str] = []

    async def open(self) -> None:
        self.conn = await asyncpg.connect(self.db.dsn, server_settings={"track_functions": "all"})
        self.pid = await self.conn.fetchval("SELECT pg_backend_pid()")
        if not hasattr(self, "observer"):
            self.observer = await asyncpg.connect(self.db.dsn)

    async def rounds(self, users: list[str], n: int, kind: str = "debits") -> None:
        """`n` rounds: a batch of BATCH debits each, or BATCH holds, captures or
        releases, each its own `apply_batch` statement and commit, as one client's is,
        or BATCH operations in mixed batches of MIXED (`kind`)."""
        for _ in range(n):
            payloads = self._payloads(users, kind)
            cpu = cpu_seconds(self.pid)
            started = time.perf_counter()
            raws = [
                await self.conn.fetchval("SELECT ledger.apply_batch($1::json)::text", payload)
                for payload in payloads
            ]
            self.seconds += time.perf_counter() - started
            self.cpu += cpu_seconds(self.pid) - cpu
            results = [r for raw in raws for r in orjson.loads(raw)]
            self.debits += len(results)
            bad = [r for r in results if r["status"] not in (200, 201)]
            if bad:
                raise RuntimeError(f"{self.label}: {bad[0]}")
            if kind == "mixed":
                # The batch's new holds (201; a capture is 200): the next batch's captures.
                self.pending += [r["body"]["hold"]["id"] for r in results if r["status"] == 201]

    def _payloads(self, users: list[str], kind: str) -> list[str]:
        if kind == "debits":
            return [_direct_ops(users)]
        if kind == "single debits":
            # BATCH statements of one debit each (the committer's batch at low load).
            return [
                orjson.dumps(orjson.loads(_direct_ops(users))[:1]).decode() for _ in range(BATCH)
            ]
        if kind == "holds":
            return [orjson.dumps([_hold(users)]).decode() for _ in range(BATCH)]
        if kind in ("captures", "releases"):
            taken, self.pending = self.pending[:BATCH], self.pending[BATCH:]
            if len(taken) < BATCH:
                raise RuntimeError(f"{self.label}: {len(taken)} holds left to resolve")
            op = "capture" if kind == "captures" else "release"
            return [orjson.dumps([_resolve(op, hold)]).decode() for hold in taken]
        # mixed: MIXED // 2 new holds and captures of MIXED // 2 earlier ones per batch
        payloads = []
        for _ in range(BATCH // MIXED):
            taken, self.pending = self.pending[: MIXED // 2], self.pending[MIXED // 2 :]
            ops = [_hold(users) for _ in range(MIXED - len(taken))]
            ops += [_resolve("capture", hold) for hold in taken]
            # The committer's order: by user for a hold, by the hold's id for a capture.
            ops.sort(key=lambda o: str(o.get("user_id") or o["hold_id"]))
            payloads.append(orjson.dumps(ops).decode())
        return payloads

    async def place_holds(self, users: list[str], n: int) -> None:
        """`n` holds to resolve later, placed 100 to a statement (not measured)."""
        conn = await asyncpg.connect(self.db.dsn)
        try:
            for start in range(0, n, 100):
                ops = [_hold(users) for _ in range(min(100, n - start))]
                raw = await conn.fetchval(
                    "SELECT ledger.apply_batch($1::json)::text", orjson.dumps(ops).decode()
                )
                self.pending += [r["body"]["hold"]["id"] for r in orjson.loads(raw)]
        finally:
            await conn.close()


MIXED = 16


def _keys() -> dict[str, object]:
    return {
        "auth": BENCH_AUTH,
        "key": uuid.uuid4().hex,
        "scope": "app:bench",
        "hash": uuid.uuid4().hex,
    }


def _hold(users: list[str]) -> dict[str, object]:
    """A hold as the service sends it (TTL an hour: none expires during the run)."""
    return {
        "op": "reserve",
        "user_id": users[secrets.randbelow(len(users))],
        "amount": 1000,
        "app": "bench",
        "ttl_seconds": 3600,
        "reference": None,
        "description": None,
        **_keys(),
    }


def _resolve(op: str, hold: str) -> dict[str, object]:
    """A capture of 40 % of a hold (the rest goes back), or a release."""
    return {"op": op, "hold_id": hold, **({"amount": 400} if op == "capture" else {}), **_keys()}


async def case(variants: list[Variant], name: str, users: list[str], kind: str = "debits") -> None:
    resolving = kind in ("captures", "releases")
    for v in variants:
        await v.open()
        v.pending = []
        if resolving:
            await v.place_holds(users, (3 + ROUNDS) * BATCH)
        await v.rounds(users, 3, kind)  # warm the plan caches and the buffers
        # Statistics for the rows the warm-up wrote (the holds table starts empty): a
        # plan made for an empty table scans it whole once it is not.
        await v.conn.execute("ANALYZE")
        # Statistics reach the collector when a session closes (or idles 10 s): the
        # warm-up's go with this connection, the measured rounds run on a fresh one.
        await v.conn.close()
        await v.open()
        v.seconds, v.cpu, v.debits = 0.0, 0.0, 0
    await asyncio.sleep(0.5)
    before = [await _snapshot(v.observer) for v in variants]
    # Interleaved, so a neighbour's load on the machine falls on every variant alike.
    for _ in range(ROUNDS // 5):
        for v in variants:
            await v.rounds(users, 5, kind)
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
    if len(variants) > 1:
        base = variants[0].cpu / variants[0].debits
        for v in variants[1:]:
            print(f"   backend CPU per operation, {v.label} / {variants[0].label}: "
                  f"{v.cpu / v.debits / base:.2f}")  # fmt: skip


async def one_client_latency(variants: list[Variant], users: list[str], n: int) -> None:
    """One client's hold, as the generation service's time to first token sees it: the
    wall time of one-hold statements, the variants alternating hold by hold (so each
    pair meets the same load), beside a bare one-row commit on each database."""
    conns = [await asyncpg.connect(v.db.dsn) for v in variants]
    holds: list[list[float]] = [[] for _ in variants]
    commits: list[list[float]] = [[] for _ in variants]
    try:
        for conn in conns:
            await conn.execute("CREATE TABLE IF NOT EXISTS bench_raw (id int PRIMARY KEY, n int)")
            await conn.execute("INSERT INTO bench_raw VALUES (1, 0) ON CONFLICT DO NOTHING")
        for _ in range(n):
            for k, conn in enumerate(conns):
                payload = orjson.dumps([_hold(users)]).decode()
                started = time.perf_counter()
                raw = await conn.fetchval("SELECT ledger.apply_batch($1::json)::text", payload)
                holds[k].append(time.perf_counter() - started)
                if orjson.loads(raw)[0]["status"] != 201:
                    raise RuntimeError(f"{variants[k].label}: {raw[:200]}")
                started = time.perf_counter()
                await conn.execute("UPDATE bench_raw SET n = n + 1 WHERE id = 1")
                commits[k].append(time.perf_counter() - started)
    finally:
        for conn in conns:
            await conn.close()
    print(f"\n== one client's hold, {n} per variant, alternating (p50 wall)")
    for v, h, c in zip(variants, holds, commits, strict=True):
        hold, commit = statistics.median(h) * 1e3, statistics.median(c) * 1e3
        print(
            f"-- {v.label}: hold {hold:.2f} ms, a bare one-row commit {commit:.2f} ms,"
            f" the hold's SQL beyond the commit {hold - commit:.2f} ms"
        )


def _report(v: Variant, before: tuple, after: tuple) -> None:
    n = v.debits
    print(
        f"-- {v.label}: {v.cpu / n * 1e6:.0f} us of backend CPU per operation; wall "
        f"{v.seconds / n * 1e6:.0f} us per operation ({n / v.seconds:,.0f}/s on one connection)"
    )
    print(
        f"   {'table':<18}{'ins/op':>10}{'upd/op':>10}{'of which HOT':>13}"
        f"{'indexes':>8}{'index entries/op':>21}"
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
        f"   {'index entries written per operation (partial indexes counted as written)':<59}"
        f"{total_entries:>21.2f}"
    )
    print(f"   {'function':<22}{'calls/op':>12}{'self us/op':>15}{'total us/op':>16}")
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
        await case(variants, f"{BATCH} debits over 10 users", many[:10])
        await case(variants, "debits, one per statement", many, "single debits")
        if os.environ.get("KU_BENCH_SQL_HOLDS", "1") == "1":
            await case(variants, "holds, one per statement (its commit included)", many, "holds")
            await case(variants, "captures of 40 %, one per statement", many, "captures")
            await case(variants, "releases, one per statement", many, "releases")
            await case(
                variants, f"mixed batches of {MIXED}: half holds, half captures", many, "mixed"
            )
            await one_client_latency(variants, many, LATENCY_HOLDS)
    finally:
        for v in variants:
            await v.db.__aexit__(None, None, None)


if __name__ == "__main__":
    asyncio.run(main())
