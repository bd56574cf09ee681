"""The SQL side of the authority model (issue 8): `ledger.apply` enforces the `auth`
each operation carries, inside the transaction that moves the money, deny by
default. The Python side (who gets which `auth`) is tested with the endpoints."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest

from services.kit.db import plain_url

PENORA = {"user": "any", "owner": "app:penora", "holds": "app:penora", "charges": "penora"}


@pytest.fixture
async def db(ku_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(plain_url(ku_database_url))
    yield conn
    await conn.close()


async def apply(db: asyncpg.Connection, op: dict[str, Any]) -> dict[str, Any]:
    raw = await db.fetchval("SELECT ledger.apply($1::jsonb)::text", orjson.dumps(op).decode())
    return orjson.loads(raw)


async def funded(db: asyncpg.Connection, milli: int = 10_000) -> str:
    user = f"auth-{uuid.uuid4().hex[:10]}"
    assert (await apply(db, {"op": "open", "user_id": user, "amount": 0, "auth": PENORA}))[
        "status"
    ] == 200
    r = await apply(
        db, {"op": "grant", "user_id": user, "amount": milli, "source": "promo", "auth": PENORA}
    )
    assert r["status"] == 201
    return user


def code(result: dict[str, Any]) -> tuple[int, str]:
    return result["status"], result.get("error", {}).get("code", "")


class TestDenyByDefault:
    @pytest.mark.parametrize(
        "auth", [None, {}, {"owner": "app:penora"}, "any", {"user": "everyone"}]
    )
    async def test_missing_or_malformed_authority_is_403(self, db, auth):
        user = await funded(db)
        op: dict[str, Any] = {"op": "debit", "user_id": user, "amount": 1, "app": "penora"}
        if auth is not None:
            op["auth"] = auth
        assert code(await apply(db, op)) == (403, "forbidden")
        assert await db.fetchval("SELECT ledger._available($1)", user) == 10_000

    async def test_a_hold_needs_an_owner(self, db):
        user = await funded(db)
        r = await apply(
            db,
            {
                "op": "reserve",
                "user_id": user,
                "amount": 1,
                "app": "penora",
                "ttl_seconds": 60,
                "auth": {"user": "any"},
            },  # fmt: skip
        )
        assert code(r) == (403, "forbidden")

    async def test_refund_without_charges_authority_is_403(self, db):
        user = await funded(db)
        tx = (
            await apply(
                db, {"op": "debit", "user_id": user, "amount": 5, "app": "penora", "auth": PENORA}
            )
        )["body"]["transaction_id"]
        r = await apply(db, {"op": "refund", "transaction_id": tx, "auth": {"user": "any"}})
        assert code(r) == (403, "forbidden")


class TestWhoseMoney:
    async def test_self_only_its_own_user(self, db):
        alice, bob = await funded(db), await funded(db)
        auth = {"user": f"self:{alice}"}
        ok = await apply(
            db, {"op": "debit", "user_id": alice, "amount": 1, "app": "x", "auth": auth}
        )
        assert ok["status"] == 201
        no = await apply(db, {"op": "debit", "user_id": bob, "amount": 1, "auth": auth})
        assert code(no) == (403, "wrong_user")

    async def test_linked_only_users_linked_to_the_app(self, db):
        linked, other = await funded(db), await funded(db)
        await db.execute(
            "INSERT INTO ledger.app_links (user_id, app) VALUES ($1, 'partnerx')", linked
        )
        auth = {"user": "linked:partnerx"}
        ok = await apply(
            db, {"op": "debit", "user_id": linked, "amount": 1, "app": "x", "auth": auth}
        )
        assert ok["status"] == 201
        no = await apply(db, {"op": "debit", "user_id": other, "amount": 1, "auth": auth})
        assert code(no) == (403, "user_not_linked")
        assert await db.fetchval("SELECT ledger._available($1)", other) == 10_000


class TestHoldsAndCharges:
    async def test_only_the_owner_resolves_a_hold(self, db):
        user = await funded(db)
        r = await apply(
            db,
            {
                "op": "reserve",
                "user_id": user,
                "amount": 1000,
                "app": "penora",
                "ttl_seconds": 60,
                "auth": PENORA,
            },  # fmt: skip
        )
        hold = r["body"]["hold"]
        assert hold["owner"] == "app:penora"
        partner = {"user": "any", "holds": "app:partnerx"}
        for kind in ("capture", "release"):
            no = await apply(db, {"op": kind, "hold_id": hold["id"], "auth": partner})
            assert code(no) == (403, "not_your_hold")
        ok = await apply(db, {"op": "capture", "hold_id": hold["id"], "auth": PENORA})
        assert ok["status"] == 200

    async def test_only_the_charging_app_refunds(self, db):
        user = await funded(db)
        tx = (
            await apply(
                db, {"op": "debit", "user_id": user, "amount": 5, "app": "penora", "auth": PENORA}
            )
        )["body"]["transaction_id"]
        partner = {"user": "any", "charges": "partnerx"}
        no = await apply(db, {"op": "refund", "transaction_id": tx, "auth": partner})
        assert code(no) == (403, "not_your_charge")
        ok = await apply(db, {"op": "refund", "transaction_id": tx, "auth": PENORA})
        assert ok["status"] == 201

    async def test_a_denial_is_not_remembered_under_the_key(self, db):
        user = await funded(db)
        op = {
            "op": "debit", "user_id": user, "amount": 1, "app": "penora",
            "key": uuid.uuid4().hex, "scope": "s", "hash": "h",
        }  # fmt: skip
        assert code(await apply(db, {**op, "auth": {"user": "self:someone"}}))[0] == 403
        assert (await apply(db, {**op, "auth": PENORA}))["status"] == 201


class TestAudit:
    async def test_audit_is_written_in_the_same_transaction(self, db):
        user = await funded(db)
        auth = {**PENORA, "audit": {"actor": "admin:ops@ku", "reason": "goodwill"}}
        r = await apply(
            db, {"op": "grant", "user_id": user, "amount": 2500, "source": "admin", "auth": auth}
        )
        row = await db.fetchrow(
            "SELECT tx_id, actor, reason, op, amount_milli, status FROM ledger.audit_log"
            " WHERE user_id = $1",
            user,
        )
        assert dict(row) == {
            "tx_id": r["body"]["transaction_id"],
            "actor": "admin:ops@ku",
            "reason": "goodwill",
            "op": "grant",
            "amount_milli": 2500,
            "status": 201,
        }


class TestLedgerService:
    """`Ledger.execute` passes the authority on, from its argument or from the op."""

    async def test_authority_in_the_op_or_as_argument_none_is_403(self, db, ku_database_url):
        from services.kit.errors import Forbidden
        from services.kit.principal import Principal
        from services.ledger.batcher import GroupCommitter
        from services.ledger.service import Ledger

        user = await funded(db)
        app = Principal(kind="app", app="penora", scopes=frozenset({"ledger:write"}))
        pool = await asyncpg.create_pool(plain_url(ku_database_url), min_size=1, max_size=2)
        try:
            ledger = Ledger(GroupCommitter(pool))
            op = {"op": "debit", "user_id": user, "amount": 1000, "app": "penora"}
            inside = await ledger.execute({**op, "auth": PENORA}, app, key=uuid.uuid4().hex)
            argument = await ledger.execute(op, app, key=uuid.uuid4().hex, auth=PENORA)
            assert inside.status_code == argument.status_code == 201
            with pytest.raises(Forbidden) as denied:
                await ledger.execute(op, app, key=uuid.uuid4().hex)
            assert denied.value.code == "forbidden"
        finally:
            await pool.close()
        assert await db.fetchval("SELECT ledger._available($1)", user) == 8_000
