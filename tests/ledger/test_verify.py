"""`ku ledger verify` passes on a sound ledger, and each named check fires on the
corruption it guards against."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator

import asyncpg
import pytest

from services.cli import main
from services.kit.db import plain_url
from services.kit.testing.plugin import drop_database, migrated_database
from services.ledger.verify import CHECKS, run_checks

ANY = '"auth": {"user": "any", "owner": "app:penora", "holds": "*", "charges": "*"}'


def _op(body: str) -> str:
    return f"SELECT ledger.apply('{{{body}, {ANY}}}');"


# A small ledger that exercises every record verify reads: lots, a debit and its draws,
# a partial refund, an active hold, a captured hold, a billing grant per payment, and a
# clawback that left a debt.
SOUND = "\n".join(
    [
        _op('"op": "open", "user_id": "u1", "amount": 0'),
        _op('"op": "open", "user_id": "u2", "amount": 0'),
        _op(
            '"op": "grant", "user_id": "u1", "amount": 50000, "source": "promo",'
            ' "expires_at": "2999-01-01T00:00:00Z"'
        ),
        _op(
            '"op": "grant", "user_id": "u1", "amount": 10000, "source": "purchase",'
            ' "reference": "pay_1", "app": "billing"'
        ),
        _op('"op": "debit", "user_id": "u1", "amount": 1500, "app": "penora"'),
        _op('"op": "refund", "transaction_id": 3, "amount": 500'),
        _op('"op": "reserve", "user_id": "u1", "amount": 2000, "app": "penora", "ttl_seconds": 60'),
        _op('"op": "reserve", "user_id": "u1", "amount": 1000, "app": "penora", "ttl_seconds": 60'),
        "SELECT ledger.apply(jsonb_build_object('op', 'capture', 'amount', 600, 'hold_id',"
        " (SELECT id FROM ledger.holds WHERE amount_milli = 1000), 'auth',"
        " jsonb_build_object('user', 'any', 'holds', '*')));",
        _op(
            '"op": "grant", "user_id": "u2", "amount": 5000, "source": "purchase",'
            ' "reference": "pay_2", "app": "billing"'
        ),
        _op('"op": "debit", "user_id": "u2", "amount": 4000, "app": "penora"'),
        _op(
            '"op": "clawback", "user_id": "u2", "amount": 5000, "source": "purchase",'
            ' "grant_reference": "pay_2", "app": "billing"'
        ),
        # An allowance (units, not Ku) of 3: one draw confirmed, one returned, one active,
        # as services/ledger/allowances.py writes them.
        "INSERT INTO ledger.allowances (user_id, kind, period, granted, used, expires_at)"
        " VALUES ('u1', 'enhancement', '2999-01', 3, 2, '2999-02-01T00:00:00Z');",
        "INSERT INTO ledger.allowance_draws (reference, user_id, kind, period, owner, status,"
        " expires_at) VALUES"
        " ('d1', 'u1', 'enhancement', '2999-01', 'service:enhancement', 'confirmed', now()),"
        " ('d2', 'u1', 'enhancement', '2999-01', 'service:enhancement', 'returned', now()),"
        " ('d3', 'u1', 'enhancement', '2999-01', 'service:enhancement', 'active',"
        "  now() + interval '1 hour');",
        "INSERT INTO ledger.allowance_entries (user_id, kind, period, entry, granted_delta,"
        " used_delta, reference) VALUES ('u1', 'enhancement', '2999-01', 'grant', 3, 0, NULL),"
        " ('u1', 'enhancement', '2999-01', 'draw', 0, 1, 'd1'),"
        " ('u1', 'enhancement', '2999-01', 'confirm', 0, 0, 'd1'),"
        " ('u1', 'enhancement', '2999-01', 'draw', 0, 1, 'd2'),"
        " ('u1', 'enhancement', '2999-01', 'return', 0, -1, 'd2'),"
        " ('u1', 'enhancement', '2999-01', 'draw', 0, 1, 'd3');",
    ]
)

U1_PROMO = "(SELECT id FROM ledger.grants WHERE user_id = 'u1' AND source = 'promo')"
U1_DEBIT = "(SELECT id FROM ledger.transactions WHERE user_id = 'u1' AND kind = 'debit')"
PAY_2_TX = "(SELECT tx_id FROM ledger.grants WHERE reference = 'pay_2')"
ACTIVE = "(SELECT id FROM ledger.holds WHERE status = 'active')"

# One corruption per check: exactly the thing it guards.
CORRUPTIONS = {
    "postings_balanced": "UPDATE ledger.postings SET amount_milli = amount_milli + 7"
    " WHERE id = (SELECT min(id) FROM ledger.postings)",
    "journal_complete": "INSERT INTO ledger.transactions (kind, user_id, delta_milli,"
    " amount_milli) VALUES ('debit', 'u1', 0, 5)",
    "wallet_balance_lots": f"UPDATE ledger.grants SET remaining_milli = remaining_milli - 1"
    f" WHERE id = {U1_PROMO}",
    "wallet_balance_journal": "UPDATE ledger.postings SET amount_milli = amount_milli + 1"
    " WHERE account = 'wallet' AND owner = 'u1' AND id = (SELECT min(id) FROM ledger.postings"
    " WHERE account = 'wallet' AND owner = 'u1')",
    "wallet_held_holds": f"UPDATE ledger.holds SET amount_milli = amount_milli + 1"
    f" WHERE id = {ACTIVE}",
    "wallet_held_journal": "UPDATE ledger.postings SET amount_milli = amount_milli + 1"
    " WHERE id = (SELECT min(id) FROM ledger.postings WHERE account = 'held')",
    "wallet_debt_journal": "UPDATE ledger.wallets SET debt_milli = debt_milli + 1"
    " WHERE user_id = 'u2'",
    "not_negative": f"UPDATE ledger.grants SET expired_milli = -1 WHERE id = {U1_PROMO}",
    "lot_conservation": f"UPDATE ledger.grants SET clawed_milli = clawed_milli + 1"
    f" WHERE id = {U1_PROMO}",
    "lot_same_user": "UPDATE ledger.draws SET grant_id = (SELECT id FROM ledger.grants"
    f" WHERE user_id = 'u2') WHERE tx_id = {U1_DEBIT}",
    "records_linked": f"UPDATE ledger.draws SET grant_id = -1 WHERE tx_id = {U1_DEBIT}",
    "charge_draws": "UPDATE ledger.draws SET amount_milli = amount_milli + 1"
    f" WHERE tx_id = {U1_DEBIT}",
    "hold_allocations": "UPDATE ledger.hold_allocations SET amount_milli = amount_milli - 1"
    f" WHERE hold_id = {ACTIVE}",
    "hold_state_journal": f"UPDATE ledger.holds SET status = 'captured' WHERE id = {ACTIVE}",
    "refunds_within_charge": "INSERT INTO ledger.transactions (kind, user_id, delta_milli,"
    f" amount_milli, refund_of) VALUES ('refund', 'u1', 0, 99999, {U1_DEBIT})",
    "system_accounts": "UPDATE ledger.postings SET owner = 'gift' WHERE account = 'issuance'"
    " AND id = (SELECT min(id) FROM ledger.postings WHERE account = 'issuance')",
    "one_grant_per_payment": "INSERT INTO ledger.transactions (kind, user_id, app,"
    " delta_milli, amount_milli, reference) VALUES ('grant', 'u1', 'billing', 0, 0, 'pay_1')",
    "clawbacks_within_grant": "INSERT INTO ledger.transactions (kind, user_id, app,"
    " delta_milli, amount_milli, refund_of)"
    f" VALUES ('clawback', 'u2', 'billing', 0, 1, {PAY_2_TX})",
    "stale_active_holds": "UPDATE ledger.holds SET expires_at = now() - interval '2 hours'"
    f" WHERE id = {ACTIVE}",
    "credit_beside_debt": "UPDATE ledger.grants SET remaining_milli = 1 WHERE reference = 'pay_2'",
    # Past the CHECK constraint too (dropped in the rolled-back transaction).
    "allowance_used_within_granted": "ALTER TABLE ledger.allowances"
    " DROP CONSTRAINT ck_allowances_used_in_range;"
    " UPDATE ledger.allowances SET used = granted + 1 WHERE user_id = 'u1'",
    "allowance_entries": "UPDATE ledger.allowances SET granted = granted + 1 WHERE user_id = 'u1'",
    # A returned draw shown as still active (its unit would count twice).
    "allowance_draws": "UPDATE ledger.allowance_draws SET status = 'active' WHERE reference = 'd2'",
    "stale_active_draws": "UPDATE ledger.allowance_draws SET expires_at = now()"
    " - interval '2 hours' WHERE reference = 'd3'",
}


def test_every_check_has_a_corruption():
    assert sorted(CORRUPTIONS) == sorted(c.name for c in CHECKS)


@pytest.fixture(scope="module")
def sound_db() -> Iterator[str]:
    """A migrated database of its own holding SOUND; corruptions roll back."""
    name = f"ku_verify_{secrets.token_hex(4)}"
    url = migrated_database(name)
    run(SOUND, plain_url(url))
    yield plain_url(url)
    asyncio.run(drop_database(name))


@pytest.fixture
def scratch_db(monkeypatch) -> Iterator[str]:
    """A database of its own whose corruption is committed (for the CLI's exit code)."""
    name = f"ku_verify_{secrets.token_hex(4)}"
    url = migrated_database(name)
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


async def _checks_after(dsn: str, corruption: str | None) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        try:
            if corruption:
                # Past the append-only triggers and foreign keys, inside this transaction.
                await conn.execute("SET LOCAL session_replication_role = replica")
                await conn.execute(corruption)
            return await run_checks(conn)
        finally:
            await tx.rollback()
    finally:
        await conn.close()


def test_sound_ledger_passes_every_check(sound_db):
    assert asyncio.run(_checks_after(sound_db, None)) == []


@pytest.mark.parametrize("check", sorted(CORRUPTIONS))
def test_corruption_fires_its_check(sound_db, check):
    problems = asyncio.run(_checks_after(sound_db, CORRUPTIONS[check]))
    assert check in {p.split(":", 1)[0] for p in problems}, problems


def test_a_posting_without_its_transaction_is_caught(sound_db):
    orphan = (
        "UPDATE ledger.postings SET tx_id = -1 WHERE id = (SELECT min(id) FROM ledger.postings)"
    )
    problems = asyncio.run(_checks_after(sound_db, orphan))
    assert "records_linked" in {p.split(":", 1)[0] for p in problems}, problems


def test_cli_names_the_breach_and_exits_1(scratch_db, capsys):
    run(SOUND, scratch_db)
    assert main(["ledger", "verify"]) == 0
    assert "all invariants hold" in capsys.readouterr().err
    run("SET session_replication_role = replica; " + CORRUPTIONS["lot_conservation"], scratch_db)
    assert main(["ledger", "verify"]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "lot_conservation" in err


def test_journal_is_append_only(sound_db):
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        run("UPDATE ledger.transactions SET amount_milli = 1", sound_db)
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        run("DELETE FROM ledger.postings", sound_db)


def test_check_constraint_is_the_last_line(sound_db):
    with pytest.raises(asyncpg.CheckViolationError):
        run("UPDATE ledger.wallets SET balance_milli = -1", sound_db)
