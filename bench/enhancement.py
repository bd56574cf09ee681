"""Enhancement throughput: tasks submitted and completed per second through the gateway,
against an instant fake provider, vs. the same provider calls made directly.

Self-contained: a scratch database on KU_DATABASE_URL's server (or the embedded one),
auth + ledger + workspace + enhancement + worker + gateway started by `ku up`'s Suite,
a fake NanoBanana on 127.0.0.1 that finishes every task at the first poll, then with
CLIENTS concurrent clients for KU_BENCH_SECONDS each:

- direct: per task, the provider calls the worker makes (submit, one poll, fetch the
  result image), straight to the fake;
- gateway: per task, POST /v1/enhancement/tasks with an app key, then GET the task
  every 50 ms until it is completed and settled (hold, worker, provider, pool, capture).

Last line: ratio=<gateway tasks per second / direct tasks per second>.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import Result, ScratchDatabase, load  # noqa: E402
from services.kit.runner import Suite, free_port  # noqa: E402
from tests.enhancement.fakes import FakeProvider, ImageHost  # noqa: E402

SECONDS = float(os.environ.get("KU_BENCH_SECONDS", "5"))
CLIENTS = int(os.environ.get("KU_BENCH_CLIENTS", "8"))


async def direct(fake: FakeProvider, images: ImageHost) -> Result:
    async def make(i: int) -> Callable[[], Awaitable[None]]:
        client = httpx.AsyncClient(base_url=fake.url, timeout=30, trust_env=False)
        auth = {"Authorization": "Bearer bench"}

        async def one() -> None:
            r = await client.post(
                "/api/v1/nanobanana/generate",
                headers=auth,
                json={"prompt": "p", "type": "IMAGETOIAMGE", "imageUrls": [images.url]},
            )
            task_id = r.json()["data"]["taskId"]
            r = await client.get(
                "/api/v1/nanobanana/record-info", headers=auth, params={"taskId": task_id}
            )
            url = r.json()["data"]["response"]["resultImageUrl"]
            assert (await client.get(url)).status_code == 200

        return one

    return await load("direct provider calls", CLIENTS, SECONDS, make)


async def through_gateway(gateway: str, key: str, users: list[str], images: ImageHost) -> Result:
    async def make(i: int) -> Callable[[], Awaitable[None]]:
        client = httpx.AsyncClient(
            base_url=gateway, timeout=60, headers={"X-API-Key": key}, trust_env=False
        )
        body = {
            "image_url": f"{images.url}/image.png",
            "enhancement_type": "lighting",
            "user_id": users[i],
        }

        async def one() -> None:
            r = await client.post("/v1/enhancement/tasks", json=body)
            assert r.status_code == 202, r.text
            task_id = r.json()["id"]
            while True:
                await asyncio.sleep(0.05)
                task = (await client.get(f"/v1/enhancement/tasks/{task_id}")).json()
                if task["status"] in ("completed", "failed") and task["settled"]:
                    assert task["status"] == "completed", task
                    return

        return one

    return await load("through the gateway", CLIENTS, SECONDS, make)


def ku(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout.strip()


async def main() -> None:
    fake = FakeProvider("nanobanana")
    images = ImageHost()
    async with ScratchDatabase() as db:
        if not os.environ.get("KU_REDIS_URL"):
            raise SystemExit("set KU_REDIS_URL (this bench runs the whole suite)")
        storage = tempfile.mkdtemp(prefix="ku-bench-enh-")
        env = {
            **os.environ,
            "KU_DATABASE_URL": db.url,
            "KU_LOG_LEVEL": "WARNING",
            "KU_BUS_PREFIX": db.bus_prefix,
            "KU_WELCOME_CREDITS_MILLI": "100000000",
            "KU_ENHANCEMENT_NANOBANANA_URL": fake.url,
            "KU_ENHANCEMENT_FETCH_ALLOW_ORIGINS": f"{fake.url},{images.url}",
            "KU_ENHANCEMENT_POLL_INTERVAL_SECONDS": "0.01",
            "KU_ENHANCEMENT_STORAGE_DIR": storage,
            "KU_WORKER_PORT": str(free_port()),
            "KU_WORKER_MAX_JOBS": "32",
        }
        with Suite(env, free_ports=True, migrate=False, quiet=True, ready_timeout=90) as suite:
            key = ku(suite.env, "keys", "create", "--app", "imagegene", "--scopes",
                     "enhance,users:write")  # fmt: skip
            admin = ku(suite.env, "keys", "create", "--app", "ops", "--scopes", "admin")
            gateway = suite.urls["gateway"]
            async with httpx.AsyncClient(base_url=gateway, timeout=30) as gw:
                r = await gw.post(
                    "/v1/enhancement/pools/nanobanana/refill",
                    json={"amount": 10_000_000},
                    headers={"X-API-Key": admin},
                )
                r.raise_for_status()
                users = []
                for _ in range(CLIENTS):
                    user = str(10**20 + secrets.randbelow(9 * 10**20))
                    r = await gw.post(
                        "/api/unified/create-user",
                        json={"user_id": user, "username": "B", "email": "b@example.com"},
                        headers={"X-API-Key": key},
                    )
                    assert r.status_code in (200, 201), r.text
                    users.append(user)
            base = await direct(fake, images)
            print(base.line(), flush=True)
            real = await through_gateway(gateway, key, users, images)
            print(real.line(), flush=True)
    fake.stop()
    images.stop()
    print(f"clients={CLIENTS} seconds={SECONDS} (tasks per second, submitted and completed)")
    print(f"ratio={real.rate / base.rate:.4f}")


if __name__ == "__main__":
    asyncio.run(main())
