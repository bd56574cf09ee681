"""Audit: `/v1/events` applies the authority table's `ledger.read` row, as the ledger
does: a partner app's key streams only the users linked to its app."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx

from services.kit.db import plain_url
from tests.gateway.conftest import Stack
from tests.gateway.helpers import create_key
from tests.gateway.test_events import open_account, read_events, spend


async def test_partner_key_streams_only_linked_users(gw: httpx.AsyncClient, stack: Stack):
    key, _ = await create_key(stack.auth, "audit-partner", ["ledger:read"])
    victim = await open_account(stack)
    headers = {"X-API-Key": key}
    # The ledger refuses this partner the user's balance (not linked to its app)...
    r = await gw.get("/v1/ledger/balance", params={"user_id": victim}, headers=headers)
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "user_not_linked"
    # ...so the gateway's own stream of that balance must refuse it too.
    async with gw.stream("GET", "/v1/events", params={"user_id": victim}, headers=headers) as r:
        if r.status_code == 200:
            await asyncio.sleep(0.2)
            await spend(stack, victim, 1.5)
            leaked = await asyncio.wait_for(read_events(r, 1), timeout=3)
            raise AssertionError(f"a partner streamed an unlinked user's balance: {leaked}")
        await r.aread()
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "user_not_linked"


async def test_partner_key_replays_no_unlinked_history_and_linked_users_stream(
    gw: httpx.AsyncClient, stack: Stack, ku_database_url: str
):
    key, _ = await create_key(stack.auth, "audit-partner", ["ledger:read"])
    victim = await open_account(stack)
    await spend(stack, victim, 2)
    headers = {"X-API-Key": key, "Last-Event-ID": "0-0"}
    r = await gw.get("/v1/events", params={"user_id": victim}, headers=headers)
    assert r.status_code == 403, r.text
    # First-party apps (users:any) still stream any user.
    first, _ = await create_key(stack.auth, "penora", ["ledger:read"])
    async with gw.stream(
        "GET", "/v1/events", params={"user_id": victim}, headers={"X-API-Key": first}
    ) as r:
        assert r.status_code == 200
    # A user linked to the partner (the ledger's copy of auth's `user.linked`) is.
    linked = await open_account(stack)
    conn = await asyncpg.connect(plain_url(ku_database_url))
    try:
        await conn.execute(
            "INSERT INTO ledger.app_links (user_id, app) VALUES ($1, 'audit-partner')", linked
        )
    finally:
        await conn.close()
    async with gw.stream(
        "GET", "/v1/events", params={"user_id": linked}, headers={"X-API-Key": key}
    ) as r:
        assert r.status_code == 200
