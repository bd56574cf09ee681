"""Redis stopped for 5 s and restarted empty under the whole suite (`ku up`'s Suite).

Named to run first in this package: it starts a second full suite, and the shared
Postgres server has too few connections for it to overlap the package's `enh` suite."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time

import asyncpg
import httpx
import pytest

from services.kit.runner import Suite, free_port
from services.kit.testing.plugin import drop_database, ku_cli
from tests.enhancement.conftest import PROVIDER_COSTS, suite_env
from tests.enhancement.fakes import FakeProvider, ImageHost
from tests.enhancement.test_flow import kinds
from tests.gateway.helpers import make_signing_key, new_user_id

pytestmark = pytest.mark.e2e


def _redis_server(port: int) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is needed for this test"
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            import redis

            if redis.Redis(port=port).ping():
                return proc
        except Exception:
            time.sleep(0.05)
    raise AssertionError("redis-server did not start")


def _dead(suite: Suite) -> str:
    """Which process died, with its last lines (the suite runs quiet)."""
    dead = suite.poll()
    if dead is None:
        return "none"
    return f"{dead}:\n" + "\n".join(suite.logs(dead[0])[-20:])


class TestRedisOutage:
    async def test_suite_rides_out_redis_restarted_empty(self, ku_database_url: str):
        # Our own Redis (the shared one on 6379 is never touched) and our own database
        # (the session suite's worker must not see these tasks).
        port = free_port()
        redis_proc = _redis_server(port)
        name = f"{ku_database_url.rsplit('/', 1)[1]}_redis"
        server = ku_database_url.rsplit("/", 1)[0]
        conn = await asyncpg.connect(server + "/postgres")
        await conn.execute(f'CREATE DATABASE "{name}"')
        await conn.close()
        providers = {n: FakeProvider(n) for n in PROVIDER_COSTS}
        images = ImageHost()
        signing = make_signing_key()
        storage = tempfile.mkdtemp(prefix="ku-enh-redis-")
        env = suite_env(f"{server}/{name}", signing, providers, images, storage)
        env["KU_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        env["KU_ENHANCEMENT_PROVIDER_TIMEOUT_SECONDS"] = "30"
        providers["nanobanana"].polls_needed = 40  # ~8 s per task: spans the outage
        try:
            # `async with`: a suite that fails to start is stopped too (no orphans).
            async with Suite(env, free_ports=True, quiet=True, ready_timeout=90) as suite:
                await self._run(suite, providers, images, port, redis_proc)
        finally:
            for fake in [*providers.values(), images]:
                fake.stop()
            redis_proc.terminate()
            redis_proc.wait()
            shutil.rmtree(storage, ignore_errors=True)
            await drop_database(name)

    async def _run(self, suite, providers, images, port, redis_proc):
        def ku(*args: str) -> str:
            return ku_cli(suite.env, *args)

        key = ku("keys", "create", "--app", "imagegene", "--scopes",
                 "enhance,ledger:read,users:write,users:any")  # fmt: skip
        admin = ku("keys", "create", "--app", "ops", "--scopes", "admin")
        gw = httpx.AsyncClient(base_url=suite.urls["gateway"], timeout=30)
        try:
            for provider in providers:
                r = await gw.post(
                    f"/v1/enhancement/pools/{provider}/refill",
                    json={"amount": 1000, "reference": "initial"},
                    headers={"X-API-Key": admin},
                )
                assert r.status_code == 200, r.text
            user = new_user_id()
            r = await gw.post(
                "/api/unified/create-user",
                json={"user_id": user, "username": "U", "email": "u@example.com"},
                headers={"X-API-Key": key},
            )
            assert r.status_code == 201, r.text
            ids = []
            for _ in range(4):
                r = await gw.post(
                    "/v1/enhancement/tasks",
                    json={"image_url": f"{images.url}/image.png", "enhancement_type": "lighting",
                          "user_id": user},
                    headers={"X-API-Key": key},
                )  # fmt: skip
                assert r.status_code == 202, r.text
                ids.append(r.json()["id"])
            deadline = time.monotonic() + 30
            while providers["nanobanana"].submits < 4:  # every task is with the provider
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)

            redis_proc.terminate()  # --save "": comes back empty
            redis_proc.wait()
            await asyncio.sleep(5)
            assert suite.poll() is None, f"a process died with Redis: {_dead(suite)}"
            new_redis = _redis_server(port)
            try:
                tasks = {}
                deadline = time.monotonic() + 90
                while len(tasks) < len(ids):
                    assert suite.poll() is None, f"a process died: {_dead(suite)}"
                    assert time.monotonic() < deadline, f"unfinished: {set(ids) - set(tasks)}"
                    for task_id in ids:
                        r = await gw.get(
                            f"/v1/enhancement/tasks/{task_id}", headers={"X-API-Key": key}
                        )
                        if r.status_code == 200 and r.json()["settled"]:
                            tasks[task_id] = r.json()
                    await asyncio.sleep(0.5)
                assert all(t["status"] == "completed" for t in tasks.values()), tasks
                assert all(t["provider"] == "nanobanana" for t in tasks.values())
                assert providers["nanobanana"].submits == 4  # each task sent once
                r = await gw.get(
                    "/v1/ledger/transactions",
                    params={"user_id": user, "limit": 100},
                    headers={"X-API-Key": key},
                )
                assert kinds(r.json()["items"]) == ["capture"] * 4 + ["reserve"] * 4
                # The worker is still there and still takes work: a new task completes.
                providers["nanobanana"].polls_needed = 0
                r = await gw.post(
                    "/v1/enhancement/tasks",
                    json={"image_url": f"{images.url}/image.png", "enhancement_type": "mood",
                          "user_id": user},
                    headers={"X-API-Key": key},
                )  # fmt: skip
                assert r.status_code == 202, r.text
                late = r.json()["id"]
                deadline = time.monotonic() + 60
                while True:
                    assert suite.poll() is None, f"a process died: {_dead(suite)}"
                    assert time.monotonic() < deadline, "the task after the outage never ran"
                    r = await gw.get(f"/v1/enhancement/tasks/{late}", headers={"X-API-Key": key})
                    if r.json()["settled"]:
                        break
                    await asyncio.sleep(0.3)
                assert r.json()["status"] == "completed"
                assert suite.poll() is None, f"a process died: {_dead(suite)}"
            finally:
                new_redis.terminate()
                new_redis.wait()
        finally:
            await gw.aclose()
