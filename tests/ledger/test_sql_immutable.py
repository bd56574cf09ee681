"""The ledger's PL/pgSQL is immutable per migration: each migration installs its own
file; released files never change; a migrated database runs exactly the newest
definition in the tree of every function; a downgrade that would lose money records
refuses."""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path

import asyncpg
import pytest
from alembic import command

from services.kit.db import plain_url
from services.kit.migrations import alembic_config

SQL_DIR = Path(__file__).resolve().parents[2] / "services" / "ledger" / "sql"

# Released files: their migrations ran on real databases. A change to a rule is a
# new migration with its own file, never an edit here.
RELEASED = {
    "0002_ledger.sql": "ce66056fc1a262372814b8052a8ccecc953b7e709c9df7736412827bf0a836a2",
    "0003_billing.sql": "69e5acace461a5077db267360b7599fa233dbdca76bbce7322154977d45cd314",
    "0004_money_rules.sql": "ccd32bc3a0911d153de36b729f459619b94fa442c1c8e72eba5e212a87c9efd0",
    "0005_lean_debits.sql": "ffbaffd3a2b19e702a7703d40b03652fd763f394d2a6ac06391f68e582194eea",
    "0006_debit_path.sql": "566d5bdae3a460c6842d8a1a8e1d6b807a6b2fa4d41de05c73ed6e8cb1c11880",
    "0007_batch_lock_order.sql": "38b48dba3f76b3463d25999ccf231ee4917ed7ce4c3b2dab388e90026fe64494",
    "0009_hold_path.sql": "4bc00d8e323dfefa8ba6e0b46432550655329cc26c4ae6d78acaba2e47baa68c",
    "0010_grouped_debits.sql": "f53b09b14097dc7d15964ea82f15914924c5494b5eb4b0cc0718d5f2f190947b",
    "0011_keys_taken.sql": "3883a925f4adb876b364901595045bab922ae70a091505b3cbdbac99d0aadc83",
}

_FUNCTION = re.compile(
    r"CREATE OR REPLACE FUNCTION ledger\.(\w+)\s*\(.*?\)\s*RETURNS.*?AS \$\$(.*?)\$\$;",
    re.DOTALL,
)


def newest_definitions(upto: str = "9999") -> dict[str, str]:
    """Function name -> body, later files overriding earlier ones (as migrations do), of
    the files of migrations up to `upto`."""
    bodies: dict[str, str] = {}
    for path in sorted(SQL_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        if path.name[:4] > upto:
            continue
        for name, body in _FUNCTION.findall(path.read_text()):
            bodies[name] = body
    return bodies


async def installed(conn: asyncpg.Connection) -> dict[str, list[str]]:
    rows = await conn.fetch(
        "SELECT p.proname, p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'ledger' ORDER BY 1"
    )
    out: dict[str, list[str]] = {}
    for r in rows:
        out.setdefault(r["proname"], []).append(r["prosrc"])
    return out


def differences(db: dict[str, list[str]], tree: dict[str, str]) -> list[str]:
    problems = [f"{n}: in the tree, not in the database" for n in tree.keys() - db.keys()]
    problems += [f"{n}: in the database, not in the tree" for n in db.keys() - tree.keys()]
    for name in db.keys() & tree.keys():
        if len(db[name]) != 1:
            problems.append(f"{name}: {len(db[name])} overloads installed")
        elif db[name][0] != tree[name]:
            problems.append(f"{name}: installed body differs from the newest file")
    return sorted(problems)


def test_released_files_never_change():
    for name, digest in RELEASED.items():
        assert hashlib.sha256((SQL_DIR / name).read_bytes()).hexdigest() == digest, name


def test_each_migration_reads_its_own_file():
    versions = SQL_DIR.parent / "migrations" / "versions"
    for sql in sorted(SQL_DIR.glob("*.sql")):
        number = sql.name[:4]
        (migration,) = versions.glob(f"{number}_*.py")
        assert f'"{sql.name}"' in migration.read_text(), (sql.name, migration.name)


class TestMigratedDatabase:
    async def test_runs_the_newest_definitions(self, ku_database_url):
        conn = await asyncpg.connect(plain_url(ku_database_url))
        try:
            assert differences(await installed(conn), newest_definitions()) == []
        finally:
            await conn.close()

    async def test_a_drifted_function_is_caught(self, ku_database_url):
        conn = await asyncpg.connect(plain_url(ku_database_url))
        try:
            async with conn.transaction():
                await conn.execute(
                    "CREATE OR REPLACE FUNCTION ledger._hold_json(p_hold uuid) RETURNS jsonb"
                    " LANGUAGE sql STABLE AS $$ SELECT '{}'::jsonb $$"
                )
                drift = differences(await installed(conn), newest_definitions())
                assert drift == ["_hold_json: installed body differs from the newest file"]
                raise _Rollback
        except _Rollback:
            pass
        finally:
            await conn.close()


class _Rollback(Exception):
    pass


def _sql(url: str, sql: str) -> None:
    async def go():
        conn = await asyncpg.connect(plain_url(url))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


AUTH = '"auth": {"user": "any", "owner": "app:x", "holds": "*", "charges": "*"}'


class TestDowngrade:
    def test_refuses_to_forgive_debt_or_lose_draws(self, scratch_url):
        _sql(
            scratch_url,
            f"""
            SELECT ledger.apply('{{"op": "open", "user_id": "u", "amount": 0, {AUTH}}}');
            SELECT ledger.apply('{{"op": "grant", "user_id": "u", "amount": 5000,
              "source": "purchase", "reference": "pay", {AUTH}}}');
            SELECT ledger.apply('{{"op": "debit", "user_id": "u", "amount": 5000,
              "app": "x", {AUTH}}}');
            SELECT ledger.apply('{{"op": "clawback", "user_id": "u", "amount": 5000,
              "source": "purchase", "grant_reference": "pay", {AUTH}}}');
            """,
        )
        cfg = alembic_config("ledger", scratch_url)
        with pytest.raises(Exception, match="outstanding debt.*per-lot draws"):
            command.downgrade(cfg, "0003")

    def test_an_empty_ledger_goes_down_and_up_again(self, scratch_url):
        cfg = alembic_config("ledger", scratch_url)
        command.downgrade(cfg, "0003")
        command.upgrade(cfg, "head")

        async def check():
            conn = await asyncpg.connect(plain_url(scratch_url))
            try:
                return differences(await installed(conn), newest_definitions())
            finally:
                await conn.close()

        assert asyncio.run(check()) == []

    def test_0009_goes_down_to_0008_as_0007_left_it(self, scratch_url):
        """0009's downgrade puts back what it replaced: 0007's functions (`_op_resolve`
        from 0004, `_apply` from 0006, `apply_batch` from 0007; 0008 defines none), the
        hold foreign keys and the user-only active-hold index."""
        cfg = alembic_config("ledger", scratch_url)
        command.downgrade(cfg, "0008")

        async def check():
            conn = await asyncpg.connect(plain_url(scratch_url))
            try:
                functions = differences(await installed(conn), newest_definitions("0007"))
                fks = await conn.fetchval(
                    "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND conrelid IN"
                    " ('ledger.holds'::regclass, 'ledger.hold_allocations'::regclass)"
                )
                index = await conn.fetchval(
                    "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_holds_user_active'"
                )
                return functions, fks, index
            finally:
                await conn.close()

        functions, fks, index = asyncio.run(check())
        assert functions == []
        assert fks == 3
        assert "(user_id)" in index
        command.upgrade(cfg, "head")
