"""What a hold, a capture and a release do in SQL since migration 0009 (docs/ledger.md
"What a hold, a capture and a release cost in SQL"): the rows each writes and the
PL/pgSQL calls each makes, counted by Postgres inside the operation's own transaction;
one outbox row per batch for captures and releases too; no foreign-key checks on holds;
the expired-hold probe; and the advance locks of a batch taken in the subtransaction
that updates the rows (no MultiXact)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest

from services.kit.db import plain_url
from services.ledger.verify import run_checks

AUTH = {"user": "any", "owner": "app:penora", "holds": "*", "charges": "*"}
TABLES = (
    "transactions", "postings", "draws", "holds", "hold_allocations", "outbox",
    "idempotency_keys", "grants", "wallets",
)  # fmt: skip


@pytest.fixture
async def db(ku_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(
        plain_url(ku_database_url), server_settings={"track_functions": "all"}
    )
    yield conn
    await conn.close()


async def _batch(db: asyncpg.Connection, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    raw = await db.fetchval("SELECT ledger.apply_batch($1::json)::text", orjson.dumps(ops).decode())
    return orjson.loads(raw)


def _keys() -> dict[str, Any]:
    key = uuid.uuid4().hex
    return {"auth": AUTH, "key": key, "scope": "app:penora", "hash": key}


async def _funded(db: asyncpg.Connection, users: int = 1, amount: int = 1_000_000) -> list[str]:
    ids = [f"hp-{uuid.uuid4().hex[:12]}" for _ in range(users)]
    ops: list[dict[str, Any]] = []
    for user in ids:
        ops.append({"op": "open", "user_id": user, "amount": 0, "auth": AUTH})
        ops.append({"op": "grant", "user_id": user, "amount": amount, "source": "promo",
                    "auth": AUTH})  # fmt: skip
    assert all(r["status"] in (200, 201) for r in await _batch(db, ops))
    return ids


def _hold(user: str, amount: int = 10_000) -> dict[str, Any]:
    return {"op": "reserve", "user_id": user, "amount": amount, "app": "penora",
            "ttl_seconds": 600, **_keys()}  # fmt: skip


def _resolve(kind: str, hold: str, amount: int | None = None) -> dict[str, Any]:
    op = {"op": kind, "hold_id": hold, **_keys()}
    if amount is not None:
        op["amount"] = amount
    return op


def _debit(user: str) -> dict[str, Any]:
    return {"op": "debit", "user_id": user, "amount": 1_000, "app": "penora", **_keys()}


async def _held(db: asyncpg.Connection, users: list[str]) -> list[str]:
    results = await _batch(db, [_hold(u) for u in users])
    assert [r["status"] for r in results] == [201] * len(users), results
    return [r["body"]["hold"]["id"] for r in results]


async def _counts(db: asyncpg.Connection) -> tuple[dict, dict]:
    tables = await db.fetch(
        "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables"
        " WHERE schemaname = 'ledger' AND relname = ANY($1::text[])",
        list(TABLES),
    )
    functions = await db.fetch(
        "SELECT funcname, calls FROM pg_stat_xact_user_functions WHERE schemaname = 'ledger'"
    )
    return (
        {r["relname"]: (r["n_tup_ins"], r["n_tup_upd"], r["n_tup_hot_upd"]) for r in tables},
        {r["funcname"]: r["calls"] for r in functions},
    )


async def _written(db: asyncpg.Connection, ops: list[dict[str, Any]]) -> tuple[list, dict, dict]:
    """The batch's results, what it wrote per table (inserted, updated, of which HOT) and
    the PL/pgSQL functions it called (how many times), in its own transaction."""
    async with db.transaction():
        tables_before, calls_before = await _counts(db)
        results = await _batch(db, ops)
        tables_after, calls_after = await _counts(db)
    zero = (0, 0, 0)
    written = {
        t: tuple(
            a - b
            for a, b in zip(tables_after.get(t, zero), tables_before.get(t, zero), strict=True)
        )
        for t in TABLES
    }
    calls = {
        f: n - calls_before.get(f, 0) for f, n in calls_after.items() if n != calls_before.get(f, 0)
    }
    return results, written, calls


async def test_a_hold_writes_seven_rows_and_checks_no_foreign_key(db):
    (user,) = await _funded(db)
    (result,), written, calls = await _written(db, [_hold(user)])
    assert result["status"] == 201, result
    assert written == {
        "transactions": (1, 0, 0),
        "postings": (2, 0, 0),
        "draws": (0, 0, 0),
        "holds": (1, 0, 0),
        "hold_allocations": (1, 0, 0),  # one per lot it holds from
        "outbox": (1, 0, 0),  # one per batch
        "idempotency_keys": (1, 0, 0),
        "grants": (0, 1, 1),  # the lot: in place
        "wallets": (0, 1, 1),
    }
    assert calls == {"apply_batch": 1, "_apply": 1, "_op_reserve": 1}
    # 0007: three foreign-key checks per hold (holds -> wallets, allocations -> holds
    # and lots), each a per-row trigger.
    fks = await db.fetchval(
        "SELECT count(*) FROM pg_constraint WHERE contype = 'f'"
        " AND conrelid IN ('ledger.holds'::regclass, 'ledger.hold_allocations'::regclass)"
    )
    assert fks == 0


async def test_a_capture_is_one_plpgsql_call_and_writes_its_rows_once(db):
    (user,) = await _funded(db)
    (hold,) = await _held(db, [user])
    (result,), written, calls = await _written(db, [_resolve("capture", hold, 4_000)])
    assert result["status"] == 200, result
    body = result["body"]
    assert body["hold"]["status"] == "captured" and body["hold"]["captured_milli"] == 4_000
    assert (body["held_milli"], body["debt_milli"]) == (0, 0)
    assert body["available_milli"] == 1_000_000 - 4_000
    assert written == {
        "transactions": (1, 0, 0),
        "postings": (3, 0, 0),  # held, spend, wallet (the rest back)
        "draws": (1, 0, 0),
        "holds": (0, 1, 0),  # its status leaves the partial indexes: not in place
        "hold_allocations": (0, 0, 0),
        "outbox": (1, 0, 0),
        "idempotency_keys": (1, 0, 0),
        "grants": (0, 1, 1),  # the rest back to its lot, once
        "wallets": (0, 1, 1),  # balance, held and debt in one update
    }
    # 0007: also _sweep_holds, _resolve_hold, _give_back, _journal, _changed,
    # _available (twice) and _hold_json.
    assert calls == {"apply_batch": 1, "_apply": 1, "_op_resolve": 1}


async def test_a_release_writes_no_draw(db):
    (user,) = await _funded(db)
    (hold,) = await _held(db, [user])
    (result,), written, calls = await _written(db, [_resolve("release", hold)])
    assert result["status"] == 200, result
    assert result["body"]["hold"]["status"] == "released"
    assert result["body"]["available_milli"] == 1_000_000
    assert written == {
        "transactions": (1, 0, 0),
        "postings": (2, 0, 0),  # held, wallet
        "draws": (0, 0, 0),
        "holds": (0, 1, 0),
        "hold_allocations": (0, 0, 0),
        "outbox": (1, 0, 0),
        "idempotency_keys": (1, 0, 0),
        "grants": (0, 1, 1),
        "wallets": (0, 1, 1),
    }
    assert calls == {"apply_batch": 1, "_apply": 1, "_op_resolve": 1}


async def test_captures_and_releases_share_the_batch_outbox_row(db):
    users = await _funded(db, 3)
    holds = await _held(db, users[:2])
    ops = [_resolve("capture", holds[0], 2_500), _resolve("release", holds[1]), _debit(users[2])]
    async with db.transaction():
        results = await _batch(db, ops)
        rows = await db.fetch(
            "SELECT payload::text FROM ledger.outbox WHERE topic = 'credits.changed'"
            " AND xmin = pg_current_xact_id()::xid"
        )
    assert [r["status"] for r in results] == [200, 200, 201], results
    (row,) = rows  # 0007: a row of its own per capture and release, beside the batch's
    events = orjson.loads(row["payload"])
    assert [e["reason"] for e in events] == ["capture", "release", "debit"]
    for event, result, user in zip(events, results, users, strict=True):
        body = result["body"]
        assert event["user_id"] == user
        assert event["transaction_id"] == body["transaction_id"]
        assert event["available_milli"] == body["available_milli"]
        assert (event["held_milli"], event["debt_milli"]) == (0, 0)
        assert event["app"] == "penora"
    # What came back to the wallet: the uncaptured rest, all of a release, none of a debit.
    assert [e["delta_milli"] for e in events] == [7_500, 10_000, -1_000]


async def test_an_expired_hold_is_still_swept_by_the_next_operation(db):
    (user,) = await _funded(db)
    stale, fresh = await _held(db, [user, user])
    await db.execute(
        "UPDATE ledger.holds SET expires_at = clock_timestamp() - interval '1 second'"
        " WHERE id = $1",
        stale,
    )
    (result,) = await _batch(db, [_resolve("capture", fresh, 1_000)])
    assert result["status"] == 200, result
    status = await db.fetchval("SELECT status FROM ledger.holds WHERE id = $1", stale)
    assert status == "expired"
    # Both holds' credit is accounted for: 1,000 spent, the rest available again.
    assert result["body"]["available_milli"] == 1_000_000 - 1_000
    # The probe reads the user's active holds by (user_id, expires_at).
    indexdef = await db.fetchval(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = 'ledger'"
        " AND indexname = 'ix_holds_user_active'"
    )
    assert "(user_id, expires_at)" in indexdef and "'active'" in indexdef


async def test_an_orphan_allocation_or_hold_is_named_by_verify(db):
    (user,) = await _funded(db)
    (hold,) = await _held(db, [user])
    tx = db.transaction()
    await tx.start()
    try:
        # No foreign key stops these any more: verify's records_linked must name them.
        await db.execute(
            "INSERT INTO ledger.hold_allocations (hold_id, grant_id, amount_milli)"
            " VALUES ($1, -1, 1)",
            hold,
        )
        await db.execute("UPDATE ledger.holds SET user_id = 'nobody-' || id WHERE id = $1", hold)
        problems = [p for p in await run_checks(db) if p.startswith("records_linked")]
    finally:
        await tx.rollback()
    assert problems, problems
    assert f"allocation {hold}/-1" in problems[0] or f"hold {hold}" in problems[0], problems


async def test_advance_locks_leave_no_multixact_on_the_wallets_a_batch_updates(db):
    """A batch holding a capture locks its users' wallets first (migration 0007). Since
    0009 it does so in the subtransaction that then updates them: a row locked by one
    subtransaction and updated by another gets a MultiXact as its old version's xmax
    (0007 took the locks in a block of their own)."""
    users = sorted(await _funded(db, 2))
    (hold,) = await _held(db, [users[1]])
    tx = db.transaction()
    await tx.start()
    try:
        await db.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
        results = await _batch(db, [_resolve("capture", hold, 1_000), _debit(users[0])])
        multis = []
        for user in users:
            # The wallet's current version, and the old one whose t_ctid points to it
            # (a HOT update stays on the page): its infomask says whether its xmax is a
            # MultiXact (HEAP_XMAX_IS_MULTI, 0x1000).
            block, offset = await db.fetchrow(
                "SELECT (ctid::text::point)[0]::int, (ctid::text::point)[1]::int"
                " FROM ledger.wallets WHERE user_id = $1",
                user,
            )
            multis.append(
                await db.fetchval(
                    "SELECT bool_or(t_infomask & 4096 <> 0) FROM"
                    " heap_page_items(get_raw_page('ledger.wallets', $1))"
                    " WHERE t_ctid = format('(%s,%s)', $1::int, $2::int)::tid AND lp <> $2::int",
                    block,
                    offset,
                )
            )
    finally:
        await tx.rollback()
    assert [r["status"] for r in results] == [200, 201], results
    assert multis == [False, False], multis


async def test_advance_locks_probe_the_wallets_by_key(db):
    """The advance locks of a batch with a capture read the wallets by key, not the
    whole table (0007's query was planned as a hash join over a scan of every wallet,
    once the table was larger than the ~100 rows Postgres guesses for the batch)."""
    have = await db.fetchval("SELECT count(*) FROM ledger.wallets")
    if have < 4_000:
        opens = [{"op": "open", "user_id": f"hp-fill-{uuid.uuid4().hex[:12]}", "amount": 0,
                  "auth": AUTH} for _ in range(4_000 - have)]  # fmt: skip
        assert all(r["status"] in (200, 201) for r in await _batch(db, opens))
    await db.execute("ANALYZE ledger.wallets")
    users = sorted(await _funded(db, 2))
    (hold,) = await _held(db, [users[1]])
    async with db.transaction():
        before = await db.fetchval(
            "SELECT seq_scan FROM pg_stat_xact_user_tables"
            " WHERE schemaname = 'ledger' AND relname = 'wallets'"
        )
        results = await _batch(db, [_resolve("capture", hold, 1_000), _debit(users[0])])
        after = await db.fetchval(
            "SELECT seq_scan FROM pg_stat_xact_user_tables"
            " WHERE schemaname = 'ledger' AND relname = 'wallets'"
        )
    assert [r["status"] for r in results] == [200, 201], results
    assert after - before == 0


async def test_a_batch_with_a_capture_and_a_raising_operation_still_isolates_it(db):
    """The advance locks are taken in the attempt's subtransaction since 0009; when an
    operation raises, the attempt rolls back with them, and the retry (one
    subtransaction per operation) takes them again: the neighbours still commit."""
    users = sorted(await _funded(db, 3))
    (hold,) = await _held(db, [users[2]])
    bad = {**_debit(users[0]), "description": "nul \u0000 byte"}
    ops = [_resolve("capture", hold, 3_000), bad, _debit(users[1])]
    async with db.transaction():
        results = await _batch(db, ops)
        rows = await db.fetch(
            "SELECT payload::text FROM ledger.outbox WHERE topic = 'credits.changed'"
            " AND xmin = pg_current_xact_id()::xid"
        )
    assert [r["status"] for r in results] == [200, 422, 201], results
    assert results[1]["error"]["code"] == "invalid_input"
    (row,) = rows
    assert [e["user_id"] for e in orjson.loads(row["payload"])] == [users[2], users[1]]
    state = await db.fetchrow(
        "SELECT h.status, h.captured_milli, w.held_milli FROM ledger.holds h"
        " JOIN ledger.wallets w ON w.user_id = h.user_id WHERE h.id = $1",
        hold,
    )
    assert tuple(state) == ("captured", 3_000, 0)
