"""Audit: docs/generation.md promises that "a hold whose settlement never happens (the
process died) expires by itself (`KU_GENERATION_HOLD_TTL_SECONDS`)". The generation
process is SIGKILLed mid-stream: its hold is left active, uncaptured, with the
configured TTL (the ledger's sweep returning expired holds is tested with the ledger)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
import pytest

from services.generation.config import GenerationSettings
from tests.generation.conftest import Env
from tests.generation.test_text import client, kinds, milli

pytestmark = pytest.mark.e2e


async def test_a_hold_left_by_a_killed_process_carries_the_ttl(gen: Env) -> None:
    user = gen.funded_user(10)
    async with client(gen, user) as c:
        async with c.stream(
            "POST",
            "/v1/generation/text",
            json={
                "prompt": "#words=200 #stall_after=5",
                "model": "fake-small",
                "max_words": 200,
                "stream": True,
            },
        ) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("event: delta"):
                    break  # words are flowing: the process dies now
            await asyncio.to_thread(gen.restart_generation)
    assert milli(gen.balance(user)["held"]) == 2000  # 200 words at x1, still held
    assert "capture" not in kinds(gen.journal(user))
    conn = await asyncpg.connect(gen.suite.env["KU_DATABASE_URL"])
    try:
        [hold] = await conn.fetch(
            "SELECT status, expires_at - created_at AS ttl FROM ledger.holds WHERE user_id = $1",
            user,
        )
    finally:
        await conn.close()
    ttl = GenerationSettings().generation_hold_ttl_seconds
    assert hold["status"] == "active"
    assert abs(hold["ttl"] - timedelta(seconds=ttl)) < timedelta(seconds=5), hold["ttl"]
