"""pytest plugin for Ku (registered by the `ku` distribution's entry point).

Per test run: a fresh database on the configured server (KU_DATABASE_URL, or the
embedded one), migrated once; a private Redis key prefix; a principal key pair for
every process (this test process holds all private keys, like a whole suite; a
`Suite` started from a test hands each child only its own). The database and the
Redis keys are removed at the end. Tests isolate by data: every test makes its own
users (`new_user_id`), so nothing needs truncating.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from services.kit.db import plain_url
from services.kit.principal import GATEWAY, PRINCIPAL_HEADER, Principal, sign_principal

RUN_ID = uuid.uuid4().hex[:10]


def _bootstrap_environment() -> dict[str, str]:
    """Runs at import time (before any settings object exists)."""
    from services.kit import embedded

    if os.environ.get("KU_TEST_DATABASE_URL"):  # already prepared (xdist worker, e2e child)
        return {}
    embedded.ensure_urls()
    server_url = os.environ["KU_DATABASE_URL"]
    database = f"ku_test_{RUN_ID}"
    test_url = embedded.with_database(server_url, database)
    env = {
        "KU_SERVER_DATABASE_URL": server_url,
        "KU_TEST_DATABASE_URL": test_url,
        "KU_DATABASE_URL": test_url,
        "KU_BUS_PREFIX": f"kutest{RUN_ID}",
        **_principal_keys(),
        # In-process gateways serve no metrics port (tests that need one pick a free port).
        "KU_GATEWAY_METRICS_PORT": "0",
        "KU_ENVIRONMENT": "test",
        "KU_LOG_LEVEL": os.environ.get("KU_LOG_LEVEL", "WARNING"),
    }
    os.environ.update(env)
    return env


def _principal_keys() -> dict[str, str]:
    from services.kit.migrations import SERVICE_ORDER
    from services.kit.principal import GATEWAY, format_keys, generate_keypair

    pairs = {name: generate_keypair() for name in (*SERVICE_ORDER, GATEWAY)}
    return {
        "KU_PRINCIPAL_KEYS": format_keys({n: pub for n, (_, pub) in pairs.items()}),
        "KU_PRINCIPAL_SIGNING_KEYS": format_keys({n: priv for n, (priv, _) in pairs.items()}),
    }


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: Any, args: Any) -> None:
    # Before any conftest imports a service, so every settings object sees the test env.
    _bootstrap_environment()


def server_url() -> str:
    """The test server's maintenance database, as asyncpg takes it."""
    return plain_url(os.environ["KU_SERVER_DATABASE_URL"])


async def create_database(name: str) -> None:
    conn = await asyncpg.connect(server_url())
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def migrated_database(name: str) -> str:
    """A database `name` of its own on the test server, every service migrated to head;
    its URL. The caller drops it (`drop_database`)."""
    from services.kit.embedded import with_database
    from services.kit.migrations import upgrade_all

    asyncio.run(create_database(name))
    url = with_database(os.environ["KU_SERVER_DATABASE_URL"], name)
    upgrade_all(url)
    return url


async def drop_database(name: str) -> None:
    conn = await asyncpg.connect(server_url())
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def ku_database_url() -> Iterator[str]:
    """The migrated test database of this run (dropped at the end)."""
    from services.kit.config import get_settings
    from services.kit.migrations import upgrade_all

    url = os.environ["KU_TEST_DATABASE_URL"]
    asyncio.run(create_database(url.rsplit("/", 1)[1].split("?")[0]))
    upgrade_all(url)
    get_settings.cache_clear()
    yield url
    name = url.rsplit("/", 1)[1].split("?")[0]
    asyncio.run(drop_database(name))
    asyncio.run(_delete_redis_keys())


async def _delete_redis_keys() -> None:
    from redis.asyncio import Redis

    redis = Redis.from_url(os.environ["KU_REDIS_URL"])
    try:
        prefix = os.environ["KU_BUS_PREFIX"]
        async for key in redis.scan_iter(match=f"{prefix}*", count=500):
            await redis.delete(key)
    finally:
        await redis.aclose()


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[FastAPI]:
    """Run an app's lifespan (startup and shutdown) around a block."""
    async with app.router.lifespan_context(app):
        yield app


@asynccontextmanager
async def asgi_client(app: FastAPI, **kwargs: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to `app` in-process, its lifespan running."""
    async with running(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver", **kwargs
        ) as client:
            yield client


def uvicorn_workers(pid: int) -> list[int]:
    """uvicorn's worker processes under supervisor `pid` (read from /proc): its children
    started by multiprocessing's spawn (not its resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


async def wait_for_workers(pid: int, count: int, seconds: float = 30) -> list[int]:
    """`uvicorn_workers(pid)` once `count` of them run, or when `seconds` have passed."""
    deadline = time.monotonic() + seconds
    while len(workers := uvicorn_workers(pid)) < count and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.2)
    return workers


def ku_cli(env: dict[str, str], *args: str) -> str:
    """Run the `ku` CLI (as an operator would) with a suite's environment; its stdout.
    A non-zero exit fails the test with the CLI's stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def principal_headers(
    kind: str = "app",
    *,
    app: str | None = "penora",
    user_id: str | None = None,
    scopes: tuple[str, ...] | set[str] = ("admin",),
    audience: str | None = None,
    issuer: str | None = None,
    now: float | None = None,
) -> dict[str, str]:
    """The signed principal header the gateway would forward to `audience`.

    `audience` defaults to the service whose tests call this (`tests/<service>/...`);
    elsewhere pass it. `issuer` defaults to the gateway (services: themselves).
    """
    if audience is None:
        audience = _audience_of_caller(sys._getframe(1).f_code.co_filename)
    principal = Principal(kind=kind, app=app, user_id=user_id, scopes=frozenset(scopes))  # type: ignore[arg-type]
    if issuer is None:
        issuer = str(app) if kind == "service" else GATEWAY
    return {PRINCIPAL_HEADER: sign_principal(principal, audience=audience, issuer=issuer, now=now)}


def _audience_of_caller(filename: str) -> str:
    from services.kit.migrations import SERVICE_ORDER

    parts = Path(filename).parts
    if "tests" in parts:
        i = len(parts) - 1 - parts[::-1].index("tests")
        if i + 1 < len(parts) and parts[i + 1] in SERVICE_ORDER:
            return parts[i + 1]
    raise TypeError(f"principal_headers() needs audience= outside tests/<service>/ ({filename})")


@pytest.fixture
def new_user_id() -> Callable[[], str]:
    """Fresh user ids (21-digit strings, like SSO ids) so tests never share data."""

    def make() -> str:
        return str(10**20 + secrets.randbelow(9 * 10**20))

    return make
