"""Migration 0010's grouped debits (docs/ledger.md "Grouped debits (migration 0010)")
against the one-by-one path they replace.

Each randomized batch runs twice in one transaction, from the same state: first through
0009's `apply_batch` (installed from the released file in a scratch schema: every
operation through `_apply`, one at a time), rolled back to a savepoint, then through the
installed `ledger.apply_batch`. The per-item results, every row of the test's users
(wallets, lots, journal, postings, draws, holds and their allocations, audit rows), the
idempotency rows of its scopes and the outbox rows the batch wrote must be the same.
Ids the two runs take from sequences are compared by their order among the ids the
batch took; hold ids by the transaction that placed the hold. The new path's state is
then kept (in a transaction rolled back at the end) and the next batch builds on it:
keys reused across batches, holds resolved, charges refunded, lots expired and debts
between batches."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
import secrets
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from alembic import command

from services.kit.db import plain_url
from services.kit.migrations import alembic_config
from tests.ledger.test_sql_immutable import installed, newest_definitions

SQL_DIR = Path(__file__).resolve().parents[2] / "services" / "ledger" / "sql"
ANY = {"user": "any", "owner": "app:penora", "holds": "*", "charges": "*"}
TX_KEYS = {"transaction_id", "tx_id", "reserve_tx_id", "resolve_tx_id", "refund_of"}


def _reference_sql(schema: str) -> str:
    """0009's `apply_batch`, as released, installed as `<schema>.apply_batch`."""
    text = (SQL_DIR / "0009_hold_path.sql").read_text()
    match = re.search(
        r"CREATE OR REPLACE FUNCTION ledger\.apply_batch\(ops json\).*?\$\$;", text, re.S
    )
    assert match
    return match.group(0).replace("FUNCTION ledger.apply_batch(", f"FUNCTION {schema}.apply_batch(")


@pytest.fixture
async def db(ku_database_url: str) -> AsyncIterator[tuple[asyncpg.Connection, str]]:
    """A connection in a transaction that is rolled back at the end: the states made
    here (a debt beside spendable lots) must not reach other tests' `verify`. Each
    batch below is a savepoint of it, so `now()` is this transaction's throughout."""
    conn = await asyncpg.connect(plain_url(ku_database_url))
    outer = conn.transaction()
    await outer.start()
    schema = f"ledger_ref_{secrets.token_hex(4)}"
    await conn.execute(f"CREATE SCHEMA {schema}")
    await conn.execute(_reference_sql(schema))
    try:
        yield conn, schema
    finally:
        await outer.rollback()
        await conn.close()


def _hash(op: dict[str, Any]) -> str:
    params = {k: v for k, v in op.items() if k not in ("auth", "key", "alt_key", "scope", "hash")}
    return hashlib.sha256(orjson.dumps(params, option=orjson.OPT_SORT_KEYS)).hexdigest()


class World:
    """The test's users and what earlier batches left to refer to."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        tag = uuid.uuid4().hex[:8]
        self.users = [f"gd-{tag}-{i}" for i in range(6)]
        self.ghost = f"gd-{tag}-ghost"  # never opened
        self.late = f"gd-{tag}-late"  # opened inside a batch
        self.scopes = [f"app:penora:{tag}", f"app:imagegene:{tag}"]
        self.keyed: list[dict[str, Any]] = []  # ops sent with keys, to send again
        self.charges: list[int] = []
        self.holds: list[str] = []
        self.payments: list[tuple[str, str]] = []  # (user, reference) of purchase lots
        self.outbox: list[str] = []  # outbox rows of earlier batches (the same `now()`)

    def keys(self, op: dict[str, Any]) -> dict[str, Any]:
        """Its idempotency keys as the service sets them: the Idempotency-Key header, or
        the natural key of its reference, or the header with the natural key beside it."""
        rng = self.rng
        op = {**op, "scope": rng.choice(self.scopes)}
        header = uuid.uuid4().hex[:10] if rng.random() < 0.9 else None
        natural = f"ref:{op['reference']}" if op.get("reference") else None
        if header is None and natural is None:
            return {k: v for k, v in op.items() if k != "scope"}  # no key at all
        if header and natural and rng.random() < 0.5:
            header = None
        op["key"] = header or natural
        if header and natural:
            op["alt_key"] = natural
        op["hash"] = _hash(op)
        return op

    def authority(self, user: str) -> dict[str, Any]:
        roll = self.rng.random()
        if roll < 0.55:
            return ANY
        if roll < 0.7:
            return {**ANY, "user": f"self:{user}"}
        if roll < 0.75:
            return {**ANY, "user": f"self:{self.users[0]}"}  # someone else's, mostly
        if roll < 0.9:
            return {**ANY, "user": "linked:penora"}  # linked for half the users
        if roll < 0.95:
            return {**ANY, "audit": {"actor": "admin:1", "reason": "test"}}
        return {"owner": "app:penora"}  # no user authority: 403

    def debit(self, user: str | None = None) -> dict[str, Any]:
        rng = self.rng
        user = user or rng.choice([*self.users, *self.users, self.ghost, self.late])
        amount: Any = rng.choice([1, 7, 250, 1_000, 1_000, 2_500, 6_000, 40_000, 10**12])
        roll = rng.random()
        if roll < 0.03:
            amount = rng.choice([0, -5, "12", 1.5, None])
        elif roll < 0.04:
            amount = "abc"  # the cast raises: the batch runs again one by one
        op: dict[str, Any] = {
            "op": "debit",
            "user_id": user,
            "amount": amount,
            "app": rng.choice(["penora", "penora", "imagegene"]) if rng.random() > 0.02 else None,
            "description": rng.choice(
                [None, "a story", "nul \u0000 byte" if roll > 0.995 else "x"]
            ),
            "reference": rng.choice([None, None, f"r{rng.randrange(1_000_000)}"]),
            "auth": self.authority(user),
        }
        return self.keys(op)

    def again(self) -> dict[str, Any] | None:
        """An earlier op with a key, sent again: the same request (a replay), maybe
        with a header key it did not have (remembered under it too), or its keys with
        other parameters (409 idempotency_key_reused)."""
        if not self.keyed:
            return None
        op = dict(self.rng.choice(self.keyed))
        roll = self.rng.random()
        if roll < 0.5:
            op["amount"] = 3 if op.get("amount") != 3 else 4
            op["hash"] = _hash(op)
        if roll > 0.3 and op.get("reference"):
            op["key"] = uuid.uuid4().hex[:10]  # a header key not seen before
            op["alt_key"] = f"ref:{op['reference']}"
        return op

    def other(self) -> dict[str, Any]:
        rng = self.rng
        user = rng.choice(self.users)
        kind = rng.choice(["grant", "grant", "reserve", "resolve", "refund", "clawback", "open"])
        if kind == "grant":
            expires = rng.choice([None, "2031-01-01T00:00:00Z", "2030-06-01T00:00:00Z"])
            op = {"op": "grant", "user_id": user, "amount": rng.choice([500, 5_000, 30_000]),
                  "source": "promo", "priority": rng.choice([0, 5]), "expires_at": expires,
                  "auth": ANY}  # fmt: skip
        elif kind == "reserve":
            op = {"op": "reserve", "user_id": user, "amount": rng.choice([300, 3_000]),
                  "app": "penora", "ttl_seconds": 600, "auth": ANY}  # fmt: skip
        elif kind == "resolve" and self.holds:
            hold = rng.choice(self.holds)
            op = {"op": rng.choice(["capture", "release"]), "hold_id": hold, "auth": ANY}
            if op["op"] == "capture" and rng.random() < 0.5:
                op["amount"] = 100
        elif kind == "refund" and self.charges:
            op = {"op": "refund", "transaction_id": rng.choice(self.charges), "auth": ANY}
        elif kind == "clawback" and self.payments:
            who, ref = rng.choice(self.payments)
            op = {"op": "clawback", "user_id": who, "amount": rng.choice([1_000, 20_000]),
                  "source": "purchase", "grant_reference": ref, "auth": ANY}  # fmt: skip
        else:
            op = {"op": "open", "user_id": self.late, "amount": 20_000, "auth": ANY}
        op = self.keys(op)
        if "key" not in op and op["op"] != "open":
            op = {**op, "scope": self.scopes[0], "key": uuid.uuid4().hex[:10]}
            op["hash"] = _hash(op)
        return op

    def batch(self, available: dict[str, int]) -> list[dict[str, Any]]:
        """`available`: each user's spendable credit before the batch, so that some
        debits take exactly what is left and the next one does not fit."""
        rng = self.rng
        ops: list[dict[str, Any]] = []
        hot = rng.choice(self.users)
        budget = dict(available)
        for _ in range(rng.randrange(1, 30)):
            roll = rng.random()
            if roll < 0.45:
                op = self.debit(hot)  # several debits of one user
                if rng.random() < 0.25 and budget.get(hot, 0) > 0:
                    op = {**op, "amount": budget[hot] if rng.random() < 0.5 else budget[hot] // 2}
                    if "key" in op:
                        op["hash"] = _hash(op)
            elif roll < 0.75:
                op = self.debit()
            elif roll < 0.87:
                op = self.again() or self.debit()
            else:
                op = self.other()
            if rng.random() < 0.1 and ops and "key" in ops[-1]:
                op = dict(ops[-1])  # the same key twice inside one batch
            ops.append(op)
            if "key" in op:
                self.keyed.append(op)
            amount = op.get("amount")
            if (
                op["op"] == "debit"
                and isinstance(amount, int)
                and 0 < amount <= budget.get(op["user_id"], 0)
            ):
                budget[op["user_id"]] -= amount
        if rng.random() < 0.6:
            # As the committer sends a batch: by user (a hold's or charge's id, else).
            ops.sort(
                key=lambda o: str(o.get("user_id") or o.get("hold_id") or o.get("transaction_id"))
            )
        return ops

    def learn(self, results: list[dict[str, Any]]) -> None:
        for r in results:
            body = r.get("body") or {}
            if r["status"] == 201 and "hold" in body and not r.get("replayed"):
                self.holds.append(body["hold"]["id"])
            elif r["status"] == 201 and "amount_milli" in body and "app" in body:
                self.charges.append(body["transaction_id"])


async def _setup(conn: asyncpg.Connection, world: World) -> None:
    ops: list[dict[str, Any]] = []
    for n, user in enumerate(world.users):
        ops.append({"op": "open", "user_id": user, "amount": 0, "auth": ANY})
        for lot in range(n % 4 + 1):
            ops.append({
                "op": "grant", "user_id": user, "amount": 1_000 * (lot + 1) + 500 * n,
                "source": "promo", "priority": (lot * 3) % 5,
                "expires_at": [None, "2030-01-01T00:00:00Z", "2029-06-01T00:00:00Z",
                               "2030-01-01T00:00:00Z"][lot],
                "auth": ANY,
            })  # fmt: skip
        ref = f"pay-{user}"
        ops.append({"op": "grant", "user_id": user, "amount": 8_000, "source": "purchase",
                    "reference": ref, "auth": ANY})  # fmt: skip
        world.payments.append((user, ref))
    results = orjson.loads(await conn.fetchval("SELECT ledger.apply_batch($1::json)::text",
                                               orjson.dumps(ops).decode()))  # fmt: skip
    assert all(r["status"] in (200, 201) for r in results), results
    # Half the users are linked to penora (authority `linked:penora`).
    await conn.execute(
        "INSERT INTO ledger.app_links (user_id, app) SELECT unnest($1::text[]), 'penora'",
        world.users[::2],
    )
    # User 1 in debt: its purchase spent, then clawed back.
    debt = world.users[1]
    raw = await conn.fetchval(
        "SELECT ledger.apply_batch($1::json)::text",
        orjson.dumps([
            {"op": "debit", "user_id": debt, "amount": 10_000, "app": "penora", "auth": ANY},
            {"op": "clawback", "user_id": debt, "amount": 8_000, "source": "purchase",
             "grant_reference": f"pay-{debt}", "auth": ANY},
        ]).decode(),
    )  # fmt: skip
    assert [r["status"] for r in orjson.loads(raw)] == [201, 201], raw
    # User 2 holds something; user 3 holds something that has expired (to sweep).
    for user in world.users[2:4]:
        raw = await conn.fetchval(
            "SELECT ledger.apply_batch($1::json)::text",
            orjson.dumps([{"op": "reserve", "user_id": user, "amount": 700, "app": "penora",
                           "ttl_seconds": 600, "auth": ANY}]).decode(),
        )  # fmt: skip
        world.learn(orjson.loads(raw))
    # User 4 owes something while it still has spendable lots. Operations do not leave
    # that state today (a debt arises only when nothing is spendable, and credit coming
    # back settles it first), but the rule is that nothing is spendable while in debt.
    await conn.execute(
        "UPDATE ledger.wallets SET debt_milli = 500 WHERE user_id = $1", world.users[4]
    )
    await _age(conn, world)


async def _available(conn: asyncpg.Connection, world: World) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT g.user_id, sum(g.remaining_milli)::bigint AS available FROM ledger.grants g"
        " WHERE g.user_id = ANY($1::text[]) AND g.spendable"
        " AND (g.expires_at IS NULL OR g.expires_at > now()) GROUP BY g.user_id",
        world.users,
    )
    return {r["user_id"]: r["available"] for r in rows}


async def _age(conn: asyncpg.Connection, world: World) -> None:
    """Time passes between batches: now and then a lot or a hold expires."""
    rng = world.rng
    if rng.random() < 0.3:
        await conn.execute(
            "UPDATE ledger.grants SET expires_at = now() - interval '1 minute' WHERE id = ("
            " SELECT id FROM ledger.grants WHERE user_id = ANY($1::text[]) AND spendable"
            " ORDER BY id OFFSET $2 LIMIT 1)",
            world.users,
            rng.randrange(10),
        )
    await conn.execute(
        "UPDATE ledger.holds SET expires_at = now() - interval '1 minute'"
        " WHERE status = 'active' AND (user_id = $1 OR id = $2::uuid)",
        world.users[3],
        rng.choice(world.holds) if world.holds and rng.random() < 0.3 else None,
    )


_ROWS = {
    "wallets": "SELECT user_id, balance_milli, held_milli, debt_milli, created_at, updated_at"
    " FROM ledger.wallets WHERE user_id = ANY($1::text[]) ORDER BY user_id",
    "grants": "SELECT id AS grant_id, user_id, source, amount_milli, remaining_milli, priority,"
    " expires_at, reference, tx_id, created_at, expired_milli, clawed_milli, settled_milli,"
    " legacy_milli, spendable FROM ledger.grants WHERE user_id = ANY($1::text[]) ORDER BY id",
    "transactions": "SELECT id AS transaction_id, kind, user_id, app, source, delta_milli,"
    " amount_milli, description, reference, hold_id::text, refund_of, created_at"
    " FROM ledger.transactions WHERE user_id = ANY($1::text[]) ORDER BY id",
    "postings": "SELECT p.tx_id, p.account, p.owner, p.amount_milli FROM ledger.postings p"
    " JOIN ledger.transactions t ON t.id = p.tx_id WHERE t.user_id = ANY($1::text[])"
    " ORDER BY p.tx_id, p.id",
    "draws": "SELECT d.tx_id, d.grant_id, d.amount_milli, d.returned_milli FROM ledger.draws d"
    " JOIN ledger.transactions t ON t.id = d.tx_id WHERE t.user_id = ANY($1::text[])"
    " ORDER BY d.tx_id, d.grant_id",
    "holds": "SELECT id::text AS hold_id, user_id, app, amount_milli, captured_milli, status,"
    " reference, description, expires_at, created_at, resolved_at, reserve_tx_id, resolve_tx_id,"
    " owner, clawed_milli FROM ledger.holds WHERE user_id = ANY($1::text[]) ORDER BY reserve_tx_id",
    "allocations": "SELECT a.hold_id::text, a.grant_id, a.amount_milli"
    " FROM ledger.hold_allocations a JOIN ledger.holds h ON h.id = a.hold_id"
    " WHERE h.user_id = ANY($1::text[])"
    " ORDER BY h.reserve_tx_id, a.grant_id",
    "audit": "SELECT tx_id, actor, reason, op, user_id, amount_milli, status, created_at"
    " FROM ledger.audit_log WHERE user_id = ANY($1::text[]) ORDER BY id",
    "keys": "SELECT scope, key, request_hash, status_code, response::text AS response, created_at"
    " FROM ledger.idempotency_keys WHERE scope = ANY($1::text[]) ORDER BY scope, key",
    "outbox": "SELECT topic, payload::text AS payload, created_at FROM ledger.outbox"
    " WHERE created_at = now() AND NOT id = ANY($1::uuid[])",
}


async def _snapshot(conn: asyncpg.Connection, world: World) -> dict[str, list[dict[str, Any]]]:
    users = [*world.users, world.ghost, world.late]
    snap: dict[str, list[dict[str, Any]]] = {}
    for name, sql in _ROWS.items():
        args = [{"keys": world.scopes, "outbox": world.outbox}.get(name, users)]
        rows = [dict(r) for r in await conn.fetch(sql, *args)]
        for row in rows:
            for col in ("response", "payload"):
                if row.get(col) is not None:
                    row[col] = orjson.loads(row[col])
        snap[name] = rows
    return snap


def _normalize(snap: dict, results: list, tx_base: int, grant_base: int) -> tuple[dict, list]:
    """Ids this batch took from sequences, as their order among them; holds it placed,
    by the transaction that placed them (and their expiry, which is `clock_timestamp()`
    plus a TTL, as a marker)."""
    new_tx = sorted(
        r["transaction_id"] for r in snap["transactions"] if r["transaction_id"] > tx_base
    )
    tx_map = {t: f"T{i}" for i, t in enumerate(new_tx)}
    new_lots = sorted(r["grant_id"] for r in snap["grants"] if r["grant_id"] > grant_base)
    lot_map = {g: f"G{i}" for i, g in enumerate(new_lots)}
    hold_map = {h["hold_id"]: f"H@{tx_map.get(h['reserve_tx_id'], h['reserve_tx_id'])}"
                for h in snap["holds"] if h["reserve_tx_id"] > tx_base}  # fmt: skip

    def norm(value: Any, key: str | None = None) -> Any:
        if isinstance(value, dict):
            out = {k: norm(v, k) for k, v in value.items()}
            if value.get("id") in hold_map or value.get("hold_id") in hold_map:
                out["expires_at"] = "placed in this batch"
            return out
        if isinstance(value, list):
            return [norm(v, key) for v in value]
        if key in TX_KEYS and isinstance(value, int):
            return tx_map.get(value, value)
        if key == "grant_id" and isinstance(value, int):
            return lot_map.get(value, value)
        if isinstance(value, str) and value in hold_map:
            return hold_map[value]
        return value

    out = {name: norm(rows) for name, rows in snap.items()}
    out["outbox"] = sorted(out["outbox"], key=lambda r: orjson.dumps(r, default=str))
    return out, norm(results)


async def _sequences(conn: asyncpg.Connection) -> tuple[int, int]:
    row = await conn.fetchrow(
        "SELECT (SELECT last_value FROM ledger.transactions_id_seq) AS tx,"
        " (SELECT last_value FROM ledger.grants_id_seq) AS lot"
    )
    return row["tx"], row["lot"]


class _Rollback(Exception):
    pass


async def _wallet_updates(conn: asyncpg.Connection) -> int:
    return await conn.fetchval(
        "SELECT n_tup_upd FROM pg_stat_xact_user_tables"
        " WHERE schemaname = 'ledger' AND relname = 'wallets'"
    )


async def _both(conn: asyncpg.Connection, schema: str, world: World, ops: list) -> tuple:
    """The batch through 0009's path (rolled back) and through the installed one
    (committed), from the same state, in one transaction (the same `now()`)."""
    payload = orjson.dumps(ops).decode()
    world.outbox = [
        str(r["id"])
        for r in await conn.fetch("SELECT id FROM ledger.outbox WHERE created_at = now()")
    ]
    async with conn.transaction():
        tx_base, lot_base = await _sequences(conn)
        try:
            async with conn.transaction():
                before = await _wallet_updates(conn)
                ref_raw = await conn.fetchval(
                    f"SELECT {schema}.apply_batch($1::json)::text", payload
                )
                ref_updates = await _wallet_updates(conn) - before
                ref = _normalize(
                    await _snapshot(conn, world), orjson.loads(ref_raw), tx_base, lot_base
                )
                raise _Rollback
        except _Rollback:
            pass
        before = await _wallet_updates(conn)
        new_raw = await conn.fetchval("SELECT ledger.apply_batch($1::json)::text", payload)
        new_updates = await _wallet_updates(conn) - before
        new = _normalize(await _snapshot(conn, world), orjson.loads(new_raw), tx_base, lot_base)
    return ref, new, orjson.loads(new_raw), ref_updates - new_updates


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_grouped_debits_match_the_one_by_one_path(db, seed):
    conn, schema = db
    seed = seed * 1_000 + int(os.environ.get("KU_TEST_SEED", "0"))
    world = World(random.Random(seed))
    await _setup(conn, world)
    saved = 0
    statuses: set[tuple[str, int]] = set()
    for n in range(40):
        ops = world.batch(await _available(conn, world))
        (ref_rows, ref_results), (new_rows, new_results), raw, fewer = await _both(
            conn, schema, world, ops
        )
        for i, (a, b) in enumerate(zip(ref_results, new_results, strict=True)):
            assert a == b, f"seed {seed}, batch {n}, item {i}: {ops[i]}"
        for table in ref_rows:
            assert ref_rows[table] == new_rows[table], f"seed {seed}, batch {n}: {table}"
        world.learn(raw)
        saved += fewer
        statuses |= {(o["op"], r["status"]) for o, r in zip(ops, raw, strict=True)}
        await _age(conn, world)
    # The cases were there, and the grouped path ran (it updates a wallet once per run).
    assert {("debit", s) for s in (201, 402, 403, 404, 409, 422)} <= statuses, statuses
    assert saved > 0


async def test_a_broken_rule_is_caught(db):
    """The comparison catches a changed rule: here a copy of 0010's functions whose
    grouped debits draw the highest-priority lot of a date last (in the scratch schema,
    compared with the installed ones)."""
    conn, schema = db
    text = (SQL_DIR / "0010_grouped_debits.sql").read_text()
    broken = text.replace("l.priority DESC, l.id) g;", "l.priority ASC, l.id) g;")
    assert broken != text
    await conn.execute(
        broken.replace("ledger._apply_batch_grouped(", f"{schema}._apply_batch_grouped(").replace(
            "FUNCTION ledger.apply_batch(", f"FUNCTION {schema}.apply_batch("
        )
    )
    world = World(random.Random(7))
    await _setup(conn, world)
    user = world.users[0]  # a never-expiring lot of priority 0, and now one of priority 5
    grant = {"op": "grant", "user_id": user, "amount": 1_000, "source": "promo", "priority": 5,
             "auth": ANY}  # fmt: skip
    await conn.fetchval("SELECT ledger.apply_batch($1::json)::text", orjson.dumps([grant]).decode())
    ops = [{"op": "debit", "user_id": user, "amount": 600, "app": "penora", "auth": ANY}] * 3
    (a_rows, a_results), (b_rows, b_results), _, _ = await _both(conn, schema, world, ops)
    assert a_results == b_results  # the same amounts, available after each...
    assert a_rows["draws"] != b_rows["draws"]  # ...drawn from other lots


def test_0010_goes_down_to_0009_and_up_again(scratch_url):
    """0010's downgrade puts back 0009's `apply_batch` and drops `_apply_batch_grouped`
    (and its settings); the upgrade installs 0010's."""
    cfg = alembic_config("ledger", scratch_url)

    async def drift(upto: str) -> tuple[list[str], list[str] | None]:
        from tests.ledger.test_sql_immutable import differences

        conn = await asyncpg.connect(plain_url(scratch_url))
        try:
            config = await conn.fetchval(
                "SELECT array_agg(proname || ':' || array_to_string(proconfig, ',')"
                " ORDER BY proname) FROM pg_proc WHERE proconfig IS NOT NULL"
                " AND pronamespace = 'ledger'::regnamespace"
            )
            return differences(await installed(conn), newest_definitions(upto)), config
        finally:
            await conn.close()

    settings = ["_apply_batch_grouped:plan_cache_mode=force_generic_plan,enable_seqscan=off"]
    command.downgrade(cfg, "0009")
    assert asyncio.run(drift("0009")) == ([], None)
    assert asyncio.run(drift("0010"))[0] == [
        "_apply_batch_grouped: in the tree, not in the database",
        "apply_batch: installed body differs from the newest file",
    ]
    command.upgrade(cfg, "0010")
    assert asyncio.run(drift("0010")) == ([], settings)
    command.upgrade(cfg, "head")
    assert asyncio.run(drift("9999")) == ([], settings)
