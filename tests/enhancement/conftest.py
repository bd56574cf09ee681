"""Fixtures for the enhancement tests.

Every test here runs under `loopback_only`: any socket connection outside
127.0.0.0/8 fails the test (even if the code under test is wrong), and test
hostnames resolve through a stub (`STUB_DNS`), never through real DNS.

`enh` starts the real processes (auth, ledger, workspace, enhancement, gateway via
`services.kit.runner.Suite`, plus a worker we control so tests can SIGKILL it) with
fake providers on 127.0.0.1."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
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
from services.kit.testing.plugin import ku_cli
from tests.enhancement.fakes import FakeProvider, ImageHost
from tests.gateway.helpers import SigningKey, make_signing_key, new_user_id

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
# Test hostnames and what they "resolve" to.
STUB_DNS = {
    "private.test": "10.1.2.3",
    "metadata.test": "169.254.169.254",
    "public.test": "93.184.215.14",  # public: the guard must stop any attempt to reach it
    "loopback.test": "127.0.0.1",
}


class GuardViolation(ConnectionRefusedError):
    """Refuses the connection like a closed port would; the recorded violation then
    fails the test at teardown, whatever the code under test did with the error."""


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    violations: list[Any] = []
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])
            if ip.version != 4 or ip not in LOOPBACK:
                violations.append(address)
                raise GuardViolation(f"test guard: connection to {address} refused")

    def connect(self: socket.socket, address: Any) -> None:
        check(self, address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(self, address)
        return real_connect_ex(self, address)

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name in STUB_DNS:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (STUB_DNS[name], port or 0))]
        if isinstance(name, str) and name.endswith((".test", ".example", ".invalid")):
            raise socket.gaierror(socket.EAI_NONAME, "stub DNS: unknown test host")
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield violations
    assert not violations, f"connections outside 127.0.0.0/8 were attempted: {violations}"


@pytest.fixture
async def enhancer(ku_database_url: str) -> AsyncIterator[Enhancer]:
    """An in-process engine on the real database and Redis (no provider configured)."""
    settings = EnhancementSettings(database_url=ku_database_url)
    engine = create_engine(settings)
    redis = redis_from_url(settings.redis_url)
    e = Enhancer(settings, sessionmaker_for(engine), redis)
    yield e
    await e.aclose()
    await redis.aclose()
    await engine.dispose()


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
    }
    for name, fake in providers.items():
        env[f"KU_ENHANCEMENT_{name.upper()}_URL"] = fake.url
        env[f"KU_ENHANCEMENT_{name.upper()}_API_KEY"] = f"key-{name}"
        env[f"KU_ENHANCEMENT_{name.upper()}_COST_MILLI"] = str(PROVIDER_COSTS[name])
    return env


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
