"""One idempotency key sent at the same moment for two different users (migration 0011).

The lookup of an operation's keys runs under its wallet's lock, which serializes one
user's requests; two users take two locks, so neither lookup sees the other's key until
it commits. Before 0011 the second's `INSERT ... ON CONFLICT DO NOTHING` waited for the
first transaction and then stored nothing, silently: both debits applied, and the key
named only the first. Now the second statement fails (`unique_violation`) and applies
nothing; the committer runs its operations again one by one, and that one is 409
`idempotency_key_reused`. Real races: two connections, separate transactions, the
first held open while the second runs."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest

from services.kit.db import plain_url
from services.ledger.batcher import GroupCommitter
from services.ledger.verify import verify

ANY = {"user": "any", "owner": "app:penora", "holds": "*", "charges": "*"}
SCOPE = "app:penora"


def debit(user: str, key: str, amount: int = 1_000) -> dict[str, Any]:
    op: dict[str, Any] = {"op": "debit", "user_id": user, "amount": amount, "app": "penora"}
    digest = hashlib.sha256(orjson.dumps(op, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return {**op, "auth": ANY, "scope": SCOPE, "key": key, "hash": digest}


async def apply(conn: asyncpg.Connection, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    raw = await conn.fetchval(
        "SELECT ledger.apply_batch($1::json)::text", orjson.dumps(ops).decode()
    )
    return orjson.loads(raw)


@pytest.fixture
async def conns(ku_database_url: str) -> AsyncIterator[tuple[asyncpg.Connection, ...]]:
    dsn = plain_url(ku_database_url)
    opened = [await asyncpg.connect(dsn) for _ in range(2)]
    try:
        yield tuple(opened)
    finally:
        for conn in opened:
            await conn.close()


async def users(conn: asyncpg.Connection, n: int) -> list[str]:
    made = [f"kt-{uuid.uuid4().hex[:12]}" for _ in range(n)]
    ops: list[dict[str, Any]] = []
    for user in made:
        ops.append({"op": "open", "user_id": user, "amount": 0, "auth": ANY})
        ops.append({"op": "grant", "user_id": user, "amount": 50_000, "source": "promo",
                    "auth": ANY})  # fmt: skip
    assert all(r["status"] in (200, 201) for r in await apply(conn, ops))
    return made


async def debits_of(conn: asyncpg.Connection, user: str) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM ledger.transactions WHERE user_id = $1 AND kind = 'debit'", user
        )
    )


# One operation in the batch (0009's path, `_apply`), or five (0010's grouped run).
@pytest.mark.parametrize("size", [1, 5])
async def test_the_second_users_statement_fails_and_applies_nothing(
    conns: tuple[asyncpg.Connection, ...], ku_database_url: str, size: int
) -> None:
    first, second = conns
    a, b, *others = await users(first, 2 + 2 * (size - 1))
    key = uuid.uuid4().hex
    tx = first.transaction()
    await tx.start()
    # The first user's debit under `key`, in a transaction left open...
    fillers = [debit(u, uuid.uuid4().hex) for u in others[: size - 1]]
    [*_, mine] = await apply(first, [*fillers, debit(a, key)])
    assert mine["status"] == 201, mine
    # ...while the second user's, under the same key, runs: its key INSERT waits.
    fillers = [debit(u, uuid.uuid4().hex) for u in others[size - 1 :]]
    racing = asyncio.ensure_future(apply(second, [*fillers, debit(b, key, amount=2_000)]))
    await asyncio.sleep(0.3)
    assert not racing.done(), racing  # it waits for the first transaction's key
    await tx.commit()
    with pytest.raises(asyncpg.UniqueViolationError, match="stored meanwhile"):
        await racing
    # Nothing of the second statement stayed: no debit of B, nor of its other users.
    assert await debits_of(second, b) == 0
    for user in others[size - 1 :]:
        assert await debits_of(second, user) == 0
    # Alone, it is what the rule says: the key was used with other parameters.
    [again] = await apply(second, [debit(b, key, amount=2_000)])
    assert (again["status"], again["error"]["code"]) == (409, "idempotency_key_reused")
    assert await debits_of(second, a) == 1 and await debits_of(second, b) == 0
    assert await verify(ku_database_url) == []


async def test_through_two_committers_one_applies_the_other_is_409(ku_database_url: str) -> None:
    """The ledger's own committer in two pools (two processes' worth): one key for two
    users at once, each with others' debits in its batch. Exactly one of the two is
    applied, the other is 409; every other debit applied once."""
    dsn = plain_url(ku_database_url)
    pools = [await asyncpg.create_pool(dsn, min_size=1, max_size=2) for _ in range(2)]
    committers = [GroupCommitter(pool) for pool in pools]
    try:
        async with pools[0].acquire() as conn:
            a, b, *others = await users(conn, 10)
        key = uuid.uuid4().hex
        lanes = [
            [debit(a, key), *(debit(u, uuid.uuid4().hex) for u in others[:4])],
            [debit(b, key, amount=2_000), *(debit(u, uuid.uuid4().hex) for u in others[4:])],
        ]
        results = await asyncio.gather(
            *(c.submit_many(ops) for c, ops in zip(committers, lanes, strict=True))
        )
        keyed = sorted(r[0]["status"] for r in results)
        assert keyed == [201, 409], results
        assert all(r["status"] == 201 for lane in results for r in lane[1:]), results
        async with pools[0].acquire() as conn:
            applied = [await debits_of(conn, u) for u in (a, b)]
            assert sorted(applied) == [0, 1], applied
            for user in others:
                assert await debits_of(conn, user) == 1, user
        assert await verify(ku_database_url) == []
    finally:
        for pool in pools:
            await pool.close()


def test_0011_goes_down_to_0010_and_up_again(scratch_url: str) -> None:
    """0011's downgrade puts back 0009's `_apply` and 0010's `_apply_batch_grouped` and
    drops `_keys_taken`; the upgrade installs 0011's."""
    from alembic import command

    from services.kit.migrations import alembic_config
    from tests.ledger.test_sql_immutable import differences, installed, newest_definitions

    cfg = alembic_config("ledger", scratch_url)

    async def drift(upto: str) -> list[str]:
        conn = await asyncpg.connect(plain_url(scratch_url))
        try:
            return differences(await installed(conn), newest_definitions(upto))
        finally:
            await conn.close()

    command.downgrade(cfg, "0010")
    assert asyncio.run(drift("0010")) == []
    assert asyncio.run(drift("9999")) == [
        "_apply: installed body differs from the newest file",
        "_apply_batch_grouped: installed body differs from the newest file",
        "_keys_taken: in the tree, not in the database",
    ]
    command.upgrade(cfg, "head")
    assert asyncio.run(drift("9999")) == []
