"""`ku ledger verify` passes on a sound ledger and fails on each kind of corruption."""

from __future__ import annotations

import asyncio
import os
import secrets

import asyncpg
import pytest

from services.cli import main
from services.kit.db import plain_url
from services.kit.embedded import with_database
from services.kit.migrations import upgrade_all
from services.kit.testing.plugin import drop_database


@pytest.fixture
def scratch_db(monkeypatch):
    """A database of its own: corrupting it cannot disturb the other tests."""
    name = f"ku_verify_{secrets.token_hex(4)}"
    url = with_database(os.environ["KU_SERVER_DATABASE_URL"], name)

    async def create():
        conn = await asyncpg.connect(plain_url(os.environ["KU_SERVER_DATABASE_URL"]))
        await conn.execute(f'CREATE DATABASE "{name}"')
        await conn.close()

    asyncio.run(create())
    upgrade_all(url)
    monkeypatch.setenv("KU_DATABASE_URL", url)
    yield plain_url(url)
    asyncio.run(drop_database(name))


def run(sql: str, dsn: str) -> None:
    async def go():
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


SOUND = """
SELECT ledger.apply('{"op":"open","user_id":"u1","amount":0}');
SELECT ledger.apply('{"op":"grant","user_id":"u1","amount":50000,"source":"promo"}');
SELECT ledger.apply('{"op":"debit","user_id":"u1","amount":1500,"app":"penora"}');
SELECT ledger.apply('{"op":"reserve","user_id":"u1","amount":2000,"app":"penora",
                     "ttl_seconds":60}');
"""

CORRUPTIONS = {
    "wallet balance": "UPDATE ledger.wallets SET balance_milli = balance_milli + 1",
    "grant remaining": "UPDATE ledger.grants SET remaining_milli = remaining_milli - 1",
    "held amount": "UPDATE ledger.wallets SET held_milli = 0",
    "unbalanced posting": "ALTER TABLE ledger.postings DISABLE TRIGGER USER;"
    " UPDATE ledger.postings SET amount_milli = amount_milli + 7 WHERE id = 1",
    "hold resolved without journal": "UPDATE ledger.holds SET status = 'captured'",
}


def test_sound_ledger_passes(scratch_db, capsys):
    run(SOUND, scratch_db)
    assert main(["ledger", "verify"]) == 0
    assert "all invariants hold" in capsys.readouterr().err


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corruption_fails(scratch_db, capsys, corruption):
    run(SOUND, scratch_db)
    run(CORRUPTIONS[corruption], scratch_db)
    assert main(["ledger", "verify"]) == 1
    assert "FAILED" in capsys.readouterr().err


def test_journal_is_append_only(scratch_db):
    run(SOUND, scratch_db)
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        run("UPDATE ledger.transactions SET amount_milli = 1", scratch_db)
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        run("DELETE FROM ledger.postings", scratch_db)


def test_check_constraint_is_the_last_line(scratch_db):
    run(SOUND, scratch_db)
    with pytest.raises(asyncpg.CheckViolationError):
        run("UPDATE ledger.wallets SET balance_milli = -1", scratch_db)
