"""The contract with the ledger: a user created here gets the welcome credits there,
through the `user.created` event alone."""

from __future__ import annotations

import asyncio
import time

from services.kit.testing.plugin import asgi_client, principal_headers
from tests.auth.helpers import app_with, claims, hs_token


async def balance_when_ready(ledger, user_id: str, wait: float = 10.0) -> dict:
    deadline = time.monotonic() + wait
    while True:
        r = await ledger.get(
            "/v1/ledger/balance",
            params={"user_id": user_id},
            headers=principal_headers(
                "app", audience="ledger", app="penora", scopes=("ledger:read", "users:any")
            ),
        )
        if r.status_code == 200 or time.monotonic() > deadline:
            return r.json()
        await asyncio.sleep(0.1)


class TestWelcomeCredits:
    async def test_api_and_sso_users_get_50_ku_once(self, auth, new_user_id, ku_database_url):
        from services.ledger.app import create_app as create_ledger

        by_api, by_sso = new_user_id(), new_user_id()
        r = await auth.post(
            "/v1/users",
            json={"user_id": by_api, "email": "w@example.com"},
            headers=app_with("users:write"),
        )
        assert r.status_code == 201
        # A repeated create must not grant twice.
        r = await auth.post(
            "/v1/users",
            json={"user_id": by_api, "email": "w@example.com"},
            headers=app_with("users:write"),
        )
        assert r.status_code == 200
        r = await auth.post("/v1/auth/sso", json={"token": hs_token(claims(by_sso))})
        assert r.status_code == 200
        async with asgi_client(create_ledger()) as ledger:
            for user_id in (by_api, by_sso):
                body = await balance_when_ready(ledger, user_id)
                assert body.get("available") == 50, body
