"""Fixtures for the enhancement tests.

Every test here runs under the network guard of `netguard.py`, in this process and in
every process the tests start: a socket connection outside 127.0.0.0/8 is refused and
fails the test (even if the code under test is wrong), and test hostnames resolve
through a stub (`netguard.STUB_DNS`), never through real DNS. This process installs it
with `loopback_only` (autouse); the children (services, gateway, worker, `ku` CLI,
started from `suite_env`) load it from `childguard/sitecustomize.py`, first on their
PYTHONPATH, and record what they refused in `CHILD_GUARD_LOG`, which `loopback_only`
checks after each test and `enh` once more when its processes have stopped.
`test_netguard.py` shows a guarded child refusing and recording a connection.

`enh` starts the real processes (auth, ledger, workspace, enhancement, gateway via
`services.kit.runner.Suite`, plus a worker we control so tests can SIGKILL it) with
fake providers on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis as sync_redis

from services.enhancement.config import EnhancementSettings
from services.enhancement.service import Enhancer
from services.kit.bus import redis_from_url
from services.kit.db import create_engine, sessionmaker_for
from services.kit.runner import Suite, free_port
from services.kit.service_client import ServiceClient
from services.kit.testing.plugin import ku_cli, running
from tests.enhancement import netguard
from tests.enhancement.fakes import FakeProvider, ImageHost
from tests.gateway.helpers import SigningKey, make_signing_key, new_user_id

# Where the children record refused connections; read by `loopback_only` after each test
# and by `enh` at its end.
CHILD_GUARD_LOG = os.path.join(
    tempfile.gettempdir(), f"ku-enh-netguard-{os.getpid()}-{uuid.uuid4().hex[:8]}.log"
)


class _ChildLog:
    offset = 0  # where the running test's part of CHILD_GUARD_LOG starts
    expected: list[dict[str, Any]] = []  # what tests provoked on purpose and took


def _unexpected(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    expected = list(_ChildLog.expected)
    out = []
    for entry in entries:
        if entry in expected:
            expected.remove(entry)
        else:
            out.append(entry)
    return out


def take_child_violations() -> list[dict[str, Any]]:
    """What the children refused since the test began ({pid, address}), taken as expected:
    for a test that provokes a refusal on purpose and checks it."""
    entries = _unexpected(netguard.violations(CHILD_GUARD_LOG, _ChildLog.offset))
    _ChildLog.expected += entries
    return entries


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """This process's connections outside 127.0.0.0/8 (refused and listed); the test fails
    if there are any, or if a child recorded one while the test ran."""
    violations: list[Any] = []
    for name, function in netguard.guarded(violations.append).items():
        target = socket.socket if name.startswith("connect") else socket
        monkeypatch.setattr(target, name, function)
    _ChildLog.offset = netguard.log_size(CHILD_GUARD_LOG)
    yield violations
    assert not violations, f"connections outside 127.0.0.0/8 were attempted: {violations}"
    children = _unexpected(netguard.violations(CHILD_GUARD_LOG, _ChildLog.offset))
    assert not children, f"child processes attempted connections outside 127.0.0.0/8: {children}"


@asynccontextmanager
async def in_process(
    settings: EnhancementSettings, client: ServiceClient | None = None
) -> AsyncIterator[Enhancer]:
    """An engine in this process on `settings`' database and Redis, closed after."""
    engine = create_engine(settings)
    redis = redis_from_url(settings.redis_url)
    e = Enhancer(settings, sessionmaker_for(engine), redis, client=client)
    try:
        yield e
    finally:
        await e.aclose()
        await redis.aclose()
        await engine.dispose()


@pytest.fixture
async def enhancer(ku_database_url: str) -> AsyncIterator[Enhancer]:
    """An in-process engine on the real database and Redis (no provider configured)."""
    async with in_process(EnhancementSettings(database_url=ku_database_url)) as e:
        yield e


@pytest.fixture
async def ledger_enhancer(ku_database_url: str) -> AsyncIterator[Enhancer]:
    """An in-process engine whose ledger calls go to an in-process ledger (its lifespan
    running) on the same real database, signed as the enhancement service."""
    from services.ledger.app import create_app

    ledger = create_app()
    async with running(ledger):
        settings = EnhancementSettings(database_url=ku_database_url)
        client = ServiceClient(
            settings, me="enhancement", transport=httpx.ASGITransport(app=ledger)
        )
        async with in_process(settings, client) as e:
            yield e


PROCESS_TOKEN = "bg-token-for-tests"
PROVIDER_COSTS = {"nanobanana": 10_000, "kie": 20_000, "fal": 30_000, "google": 40_000}


@dataclass
class Worker:
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.worker"],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.starts += 1
        url = f"http://127.0.0.1:{self.env['KU_WORKER_PORT']}/health"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "worker exited at startup"
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError("worker did not become healthy")

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@dataclass
class Enh:
    suite: Suite
    worker: Worker
    providers: dict[str, FakeProvider]
    images: ImageHost
    signing: SigningKey
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def gateway(self) -> str:
        return self.suite.urls["gateway"]

    def ku(self, *args: str) -> str:
        return ku_cli(self.suite.env, *args)

    def client(self, key: str | None = None, token: str | None = None) -> httpx.AsyncClient:
        headers = {}
        if key:
            headers["X-API-Key"] = key
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.AsyncClient(base_url=self.gateway, headers=headers, timeout=30)

    def reset_providers(self, **modes: str) -> None:
        for name, fake in self.providers.items():
            fake.start()
            if modes.get(name) == "down":
                fake.stop()
            fake.reset(modes.get(name, "ok"))
        r = sync_redis.Redis.from_url(self.suite.env["KU_REDIS_URL"])
        try:
            for key in r.scan_iter(match=f"{self.suite.env['KU_BUS_PREFIX']}:breaker:*"):
                r.delete(key)
        finally:
            r.close()

    async def new_user(self) -> str:
        user_id = new_user_id()
        async with self.client(self.keys["imagegene"]) as gw:
            r = await gw.post(
                "/api/unified/create-user",
                json={"user_id": user_id, "username": "U", "email": f"{user_id}@example.com"},
            )
            assert r.status_code == 201, r.text
        return user_id

    async def wait(
        self, task_id: str, key: str | None = None, within: float = 60
    ) -> dict[str, Any]:
        """Poll a task until it is finished and settled."""
        async with self.client(key or self.keys["imagegene"]) as gw:
            deadline = time.monotonic() + within
            while True:
                r = await gw.get(f"/v1/enhancement/tasks/{task_id}")
                assert r.status_code == 200, r.text
                task: dict[str, Any] = r.json()
                if task["status"] in ("completed", "failed") and task["settled"]:
                    return task
                assert time.monotonic() < deadline, f"task not finished: {task}"
                await _sleep(0.2)

    async def journal(self, user_id: str) -> list[dict[str, Any]]:
        async with self.client(self.keys["imagegene"]) as gw:
            r = await gw.get("/v1/ledger/transactions", params={"user_id": user_id, "limit": 200})
            assert r.status_code == 200, r.text
            return list(r.json()["items"])

    async def balance(self, user_id: str) -> dict[str, Any]:
        async with self.client(self.keys["imagegene"]) as gw:
            r = await gw.get("/v1/ledger/balance", params={"user_id": user_id})
            assert r.status_code == 200, r.text
            return dict(r.json())

    async def pools(self) -> dict[str, dict[str, Any]]:
        """The platform pools by provider (admin view; amounts in credits)."""
        async with self.client(self.keys["admin"]) as gw:
            r = await gw.get("/v1/enhancement/pools")
            assert r.status_code == 200, r.text
            return {p["provider"]: p for p in r.json()}

    async def sql(self, query: str, *args: Any) -> list[dict[str, Any]]:
        """A statement on the suite's database (real Postgres), its rows."""
        import asyncpg

        conn = await asyncpg.connect(self.suite.env["KU_DATABASE_URL"])
        try:
            return [dict(r) for r in await conn.fetch(query, *args)]
        finally:
            await conn.close()

    async def pool_calls(self, task_id: str) -> list[tuple[str, int]]:
        """The provider calls a task's pools paid for: (provider, milli credits)."""
        rows = await self.sql(
            "SELECT provider, amount_milli FROM enhancement.pool_entries"
            " WHERE task_id = $1 AND kind = 'consume' ORDER BY created_at",
            uuid.UUID(task_id),
        )
        return [(r["provider"], r["amount_milli"]) for r in rows]

    @asynccontextmanager
    async def own_enhancer(self, **overrides: Any) -> AsyncIterator[Enhancer]:
        """An in-process engine of the test's own on the suite's database, ledger and
        storage (no provider configured, no queue: nothing runs it but the test)."""
        settings = EnhancementSettings(
            database_url=self.suite.env["KU_DATABASE_URL"],
            ledger_url=self.suite.urls["ledger"],
            enhancement_storage_dir=self.suite.env["KU_ENHANCEMENT_STORAGE_DIR"],
            **overrides,
        )
        async with in_process(settings) as e:
            yield e


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def suite_env(ku_database_url: str, signing: SigningKey, providers: dict[str, FakeProvider],
              images: ImageHost, storage_dir: str) -> dict[str, str]:  # fmt: skip
    env = {
        **os.environ,
        "KU_DATABASE_URL": ku_database_url,
        "KU_AUTH_PRIVATE_KEY": signing.private_pem,
        "KU_AUTH_KEY_ID": signing.kid,
        "KU_LOG_LEVEL": "WARNING",
        "KU_ENHANCEMENT_STORAGE_DIR": storage_dir,
        "KU_ENHANCEMENT_LEASE_SECONDS": "3",
        "KU_ENHANCEMENT_POLL_INTERVAL_SECONDS": "0.2",
        "KU_ENHANCEMENT_PENDING_EVERY_SECONDS": "2",
        "KU_ENHANCEMENT_PROVIDER_TIMEOUT_SECONDS": "3",
        "KU_ENHANCEMENT_TASK_DEADLINE_SECONDS": "120",
        # A stalled image host (ImageHost /stall) is given up on after this long.
        "KU_ENHANCEMENT_FETCH_TIMEOUT_SECONDS": "3",
        "KU_ENHANCEMENT_FETCH_ALLOW_ORIGINS": ",".join(
            [images.url, *(p.url for p in providers.values())]
        ),
        "KU_WORKER_PORT": str(free_port()),
        "KU_ENHANCEMENT_PROCESS_TOKEN": PROCESS_TOKEN,
        # Small pools: the Postgres server is shared with every other test run.
        "KU_DB_POOL_SIZE": "2",
        "KU_DB_MAX_OVERFLOW": "3",
        "KU_WORKER_DB_POOL_SIZE": "2",
        "KU_WRITE_POOL_SIZE": "2",
        "KU_GENERATION_RECORDS_POOL_SIZE": "2",
    }
    for name, fake in providers.items():
        env[f"KU_ENHANCEMENT_{name.upper()}_URL"] = fake.url
        env[f"KU_ENHANCEMENT_{name.upper()}_API_KEY"] = f"key-{name}"
        env[f"KU_ENHANCEMENT_{name.upper()}_COST_MILLI"] = str(PROVIDER_COSTS[name])
    # Every process started from this environment runs under the network guard.
    return netguard.child_env(env, CHILD_GUARD_LOG)


# Package scope: the processes (and their database connections) end with this package's
# tests instead of staying up for the rest of the run.
@pytest.fixture(scope="package")
def enh(ku_database_url: str) -> Iterator[Enh]:
    signing = make_signing_key()
    providers = {name: FakeProvider(name) for name in PROVIDER_COSTS}
    images = ImageHost()
    with tempfile.TemporaryDirectory(prefix="ku-enh-") as storage_dir:
        env = suite_env(ku_database_url, signing, providers, images, storage_dir)
        env["KU_WORKER_SERVICES"] = "ledger,enhancement"
        with Suite(
            env,
            only=["auth", "ledger", "workspace", "enhancement", "gateway"],
            free_ports=True,
            migrate=False,
            quiet=True,
            ready_timeout=60,
        ) as suite:
            worker = Worker(dict(suite.env))
            try:  # whatever fails below, the worker we started is stopped
                worker.start()
                e = Enh(suite, worker, providers, images, signing)
                scopes = (
                    "enhance,ledger:read,ledger:write,users:write,workspace:read,workspace:write,"
                    "users:any"  # ImageGene and Penora are first-party
                )
                e.keys["imagegene"] = e.ku(
                    "keys", "create", "--app", "imagegene", "--scopes", scopes
                )
                e.keys["penora"] = e.ku(
                    "keys", "create", "--app", "penora", "--scopes", "enhance,users:any"
                )
                e.keys["admin"] = e.ku("keys", "create", "--app", "ops", "--scopes", "admin")
                for name in providers:
                    r = httpx.post(
                        f"{e.gateway}/v1/enhancement/pools/{name}/refill",
                        json={"amount": 100_000, "reference": f"initial-{name}"},
                        headers={"X-API-Key": e.keys["admin"]},
                        timeout=10,
                    )
                    assert r.status_code == 200, r.text
                yield e
            finally:
                worker.stop()
    for fake in [*providers.values(), images]:
        fake.stop()
    recorded = _unexpected(netguard.violations(CHILD_GUARD_LOG))
    assert not recorded, f"child processes attempted connections outside 127.0.0.0/8: {recorded}"
    if os.path.exists(CHILD_GUARD_LOG):  # only what tests provoked on purpose: not kept
        os.remove(CHILD_GUARD_LOG)
