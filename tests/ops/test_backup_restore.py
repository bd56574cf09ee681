"""docs/operations.md's backup, drop and restore blocks, run verbatim against a scratch
database that a real suite wrote money movements into: afterwards `ku ledger verify`
passes, every wallet and lot is as it was, and the restored suite keeps working."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from ku_client import KuClient, NotFound

from services.kit.runner import Suite
from services.kit.testing.plugin import create_database, drop_database, server_url
from tests.gateway.helpers import make_signing_key, new_user_id

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = ROOT / "docs" / "operations.md"
BIN = Path(sys.executable).parent


def doc_block(name: str) -> str:
    """The ```sh block that follows `<!-- ops-test: NAME -->` in docs/operations.md."""
    match = re.search(rf"<!-- ops-test: {name} -->\s*```sh\n(.*?)```", OPERATIONS.read_text(), re.S)
    assert match, f"no ops-test block {name!r} in {OPERATIONS}"
    return match.group(1)


def run_block(name: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", doc_block(name)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, f"{name}: {done.stdout}\n{done.stderr}"
    return done


async def _sql(url: str, query: str) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(url)
    try:
        return [tuple(r) for r in await conn.fetch(query)]
    finally:
        await conn.close()


def sql(url: str, query: str) -> list[tuple[object, ...]]:
    return asyncio.run(_sql(url, query))


WALLETS = "SELECT user_id, balance_milli, held_milli FROM ledger.wallets ORDER BY user_id"
LOTS = "SELECT id, user_id, source, remaining_milli, expires_at FROM ledger.grants ORDER BY id"
COUNTS = (
    "SELECT (SELECT count(*) FROM ledger.transactions), (SELECT count(*) FROM ledger.postings),"
    " (SELECT count(*) FROM ledger.holds), (SELECT count(*) FROM auth.api_keys)"
)


@pytest.fixture
def scratch_url(ku_database_url: str) -> Iterator[str]:
    name = f"ku_ops_{uuid.uuid4().hex[:10]}"
    asyncio.run(create_database(name))
    base = server_url().rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(drop_database(name))


def suite(env: dict[str, str]) -> Suite:
    return Suite(
        env,
        only=["auth", "ledger", "gateway"],
        free_ports=True,
        migrate=False,
        quiet=True,
        ready_timeout=45,
    )


def wait_for_account(client: KuClient, user_id: str) -> None:
    for _ in range(150):
        try:
            client.balance(user_id)
            return
        except NotFound:
            time.sleep(0.1)
    raise AssertionError(f"no ledger account for {user_id} after 15 s")


class TestBackupRestore:
    def test_backup_drop_restore_verify(self, scratch_url: str, tmp_path: Path):
        signing = make_signing_key()
        env = {
            **os.environ,
            "KU_DATABASE_URL": scratch_url,
            # Its own streams: another suite of this run (on another database) must not
            # consume this one's `user.created` events. Under the run's prefix, so the
            # plugin's cleanup covers it.
            "KU_BUS_PREFIX": f"{os.environ['KU_BUS_PREFIX']}.ops{uuid.uuid4().hex[:8]}",
            "KU_AUTH_PRIVATE_KEY": signing.private_pem,
            "KU_AUTH_KEY_ID": signing.kid,
            "KU_LOG_LEVEL": "WARNING",
            # Small pools: the test server's connections are shared with every other run.
            "KU_DB_POOL_SIZE": "2",
            "KU_DB_MAX_OVERFLOW": "2",
            "KU_WRITE_POOL_SIZE": "2",
            "KU_GENERATION_RECORDS_POOL_SIZE": "2",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }

        def ku(*args: str) -> str:
            done = subprocess.run(
                ["ku", *args], env=env, capture_output=True, text=True, timeout=120
            )
            assert done.returncode == 0, done.stderr
            return done.stdout.strip()

        ku("migrate")
        users = [new_user_id() for _ in range(3)]
        with suite(env) as running:
            app_key = ku(
                "keys",
                "create",
                "--app",
                "imagegene",
                "--scopes",
                "ledger:read,ledger:write,users:any",
            )
            admin_key = ku("keys", "create", "--app", "ops", "--scopes", "admin")
            for user in users:
                ku("users", "create", "--id", user, "--email", f"{user}@example.com")
            url = running.urls["gateway"]
            with KuClient(url, api_key=app_key) as app, KuClient(url, api_key=admin_key) as admin:
                for user in users:  # the ledger opens accounts from the `user.created` event
                    wait_for_account(app, user)
                app.debit(users[0], 7_250, reference="img-1")
                held = app.reserve(users[1], 10_000, ttl_seconds=3600)
                app.capture(app.reserve(users[1], 2_000).hold.id, 1_500)
                admin.grant(users[2], 12_345, "promo", description="launch", reason="launch")
                before = {u: app.balance(u) for u in users}
        wallets, lots, counts = (
            sql(scratch_url, WALLETS),
            sql(scratch_url, LOTS),
            sql(scratch_url, COUNTS),
        )
        assert len(wallets) == 3 and counts[0][2] == 2

        run_block("backup", env, tmp_path)
        dumps = {p.name for p in (tmp_path / "backup").iterdir()}
        assert {"auth.dump", "ledger.dump", "workspace.dump"} <= dumps

        run_block("drop", env, tmp_path)
        left = sql(
            scratch_url,
            "SELECT schema_name FROM information_schema.schemata"
            " WHERE schema_name IN ('auth', 'ledger', 'workspace')",
        )
        assert left == []

        restored = run_block("restore", env, tmp_path)
        assert "ledger verify: all invariants hold" in restored.stderr
        assert sql(scratch_url, WALLETS) == wallets
        assert sql(scratch_url, LOTS) == lots
        assert sql(scratch_url, COUNTS) == counts

        # The restored suite serves the same balances and moves money again (its
        # sequences came back too: a new transaction does not collide with an old id).
        with suite(env) as running, KuClient(running.urls["gateway"], api_key=app_key) as app:
            for user in users:
                now = app.balance(user)
                assert (now.available_milli, now.held_milli) == (
                    before[user].available_milli,
                    before[user].held_milli,
                )
            assert app.capture(held.hold.id, 10_000).hold.status == "captured"
            charge = app.debit(users[0], 1_000, reference="after-restore")
            assert charge.available_milli == before[users[0]].available_milli - 1_000
        assert (
            "all invariants hold"
            in subprocess.run(
                ["ku", "ledger", "verify"], env=env, capture_output=True, text=True, timeout=120
            ).stderr
        )
