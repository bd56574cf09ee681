"""The 1 MB quota under real concurrency: the workspace as two uvicorn worker processes
(`KU_WORKSPACE_PROCESSES=2`), saves, growing updates and deletes of one user racing
across them. The total never passes the limit, and `usage.used_bytes` stays the sum of
the projects' `size_bytes` (no byte freed twice, none lost)."""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from services.kit.db import plain_url
from services.kit.runner import Suite
from services.kit.testing.plugin import wait_for_workers
from tests.workspace.helpers import admin, app_key

pytestmark = pytest.mark.e2e

LIMIT = 1_048_576
BLOCK = 100_000


async def _totals(url: str, user_id: str) -> tuple[int, int, int]:
    conn = await asyncpg.connect(plain_url(url))
    try:
        used = await conn.fetchval(
            "SELECT used_bytes FROM workspace.usage WHERE user_id = $1", user_id
        )
        total, count = await conn.fetchrow(
            "SELECT COALESCE(SUM(size_bytes), 0)::bigint, COUNT(*)::int"
            " FROM workspace.projects WHERE user_id = $1",
            user_id,
        )
        return int(used), int(total), int(count)
    finally:
        await conn.close()


async def test_quota_holds_across_two_processes(ku_database_url: str, new_user_id) -> None:
    env = {**os.environ, "KU_WORKSPACE_PROCESSES": "2"}
    with Suite(env, only=["workspace"], free_ports=True, quiet=True) as suite:
        supervisor = suite.processes["workspace"].pid
        assert len(await wait_for_workers(supervisor, 2)) == 2
        user = new_user_id()
        # Fresh connections per request, so the kernel spreads them over both workers.
        async with httpx.AsyncClient(
            base_url=suite.urls["workspace"],
            timeout=60,
            limits=httpx.Limits(max_keepalive_connections=0),
        ) as client:

            async def create(n: int) -> httpx.Response:
                return await client.post(
                    "/v1/workspace/projects",
                    json={
                        "user_id": user,
                        "app_source": "penora",
                        "title": f"p{n}",
                        "content": "x" * BLOCK,
                        "content_encoding": "text",
                    },
                    headers={**app_key(), "Idempotency-Key": uuid.uuid4().hex},
                )

            results = await asyncio.gather(*(create(n) for n in range(24)))
            made = [r.json()["code"] for r in results if r.status_code == 201]
            assert {r.status_code for r in results} <= {201, 413}, [r.text for r in results]
            assert len(made) == LIMIT // (BLOCK + 3), len(made)
            used, total, count = await _totals(ku_database_url, user)
            assert used == total <= LIMIT and count == len(made)

            # Now race deletes (each twice), growing and shrinking updates and new saves.
            async def delete(code: str) -> int:
                r = await client.delete(f"/v1/workspace/projects/{code}", headers=app_key())
                return r.status_code

            async def resize(code: str, size: int) -> int:
                r = await client.patch(
                    f"/v1/workspace/projects/{code}",
                    json={"content": "y" * size, "content_encoding": "text"},
                    headers=app_key(),
                )
                return r.status_code

            gone, grow = made[:4], made[4:]
            codes: list[Any] = await asyncio.gather(
                *(delete(c) for c in gone),
                *(delete(c) for c in gone),
                *(resize(c, BLOCK * 2) for c in grow),
                *(resize(c, 10) for c in grow),
                *(create(100 + n) for n in range(8)),
            )
            deletes = codes[: 2 * len(gone)]
            assert sorted(deletes) == [200] * len(gone) + [404] * len(gone), deletes
            rest = [c if isinstance(c, int) else c.status_code for c in codes[2 * len(gone) :]]
            assert set(rest) <= {200, 201, 413}, rest
            used, total, count = await _totals(ku_database_url, user)
            assert used == total <= LIMIT, (used, total)
            r = await client.get("/v1/workspace/storage", params={"user_id": user}, headers=admin())
            assert r.json()["used_bytes"] == used and r.json()["project_count"] == count
