"""The seeds' integration flow, replayed through the gateway against real processes."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.conftest import E2E
from tests.gateway.helpers import new_user_id

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def imagegene_key(e2e: E2E) -> str:
    return e2e.new_key("imagegene", "ledger:read,ledger:write,users:write")


class TestSeedFlow:
    async def test_create_user_info_deduct_transactions(self, e2e: E2E, imagegene_key: str):
        user_id = new_user_id()
        headers = {"X-API-Key": imagegene_key}
        async with httpx.AsyncClient(base_url=e2e.gateway, headers=headers, timeout=10) as gw:
            r = await gw.post(
                "/api/unified/create-user",
                json={
                    "user_id": user_id,
                    "username": "Test User",
                    "email": "test@example.com",
                    "initial_credits": 1000,  # a client never chooses its balance
                },
            )
            assert r.status_code == 201, r.text
            assert r.json()["success"] is True and r.json()["credits"] == 50

            r = await gw.get("/api/unified/user-info", params={"user_id": user_id})
            assert r.status_code == 200, r.text
            assert r.json()["credits"] == 50 and r.json()["user_id"] == user_id

            deduct = {
                "user_id": user_id,
                "amount": 5,
                "app_name": "imagegene",
                "description": "AI image generation - 1024x1024 artwork",
                "project_code": "img_xyz123",
            }
            r = await gw.post("/api/unified/deduct-credits", json=deduct)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["success"] is True and body["credits_deducted"] == 5
            assert body["new_balance"] == 45 and body["app_name"] == "imagegene"
            assert body["timestamp"].endswith("Z")

            # A retried call (same project code) never charges twice.
            r = await gw.post("/api/unified/deduct-credits", json=deduct)
            assert r.status_code == 200 and r.json()["new_balance"] == 45

            r = await gw.get("/api/unified/user-info", params={"user_id": user_id})
            assert r.json()["credits"] == 45

            r = await gw.get("/api/unified/transactions", params={"user_id": user_id})
            assert r.status_code == 200
            tx = r.json()
            assert tx["success"] is True
            [spent] = tx["imagegene_transactions"]
            assert spent["amount"] == 5 and spent["project_code"] == "img_xyz123"
            assert tx["penora_transactions"] == []
            assert tx["total_count"] == 2  # the welcome grant and the deduction

            # A repeated create-user changes nothing.
            r = await gw.post(
                "/api/unified/create-user",
                json={"user_id": user_id, "username": "Test User", "email": "test@example.com"},
            )
            assert r.status_code == 200 and r.json()["credits"] == 45

    async def test_seed_error_bodies(self, e2e: E2E, imagegene_key: str):
        user_id = new_user_id()
        headers = {"X-API-Key": imagegene_key}
        async with httpx.AsyncClient(base_url=e2e.gateway, headers=headers, timeout=10) as gw:
            r = await gw.get("/api/unified/user-info", params={"user_id": user_id})
            assert r.status_code == 404
            assert r.json() == {"success": False, "error": "User not found", "code": "unknown_user"}
            await gw.post(
                "/api/unified/create-user",
                json={"user_id": user_id, "username": "U", "email": "u@example.com"},
            )
            r = await gw.post(
                "/api/unified/deduct-credits",
                json={"user_id": user_id, "amount": 51, "project_code": "too-much"},
            )
            assert r.status_code == 402
            assert r.json()["error"] == "Insufficient credits"
            assert r.json()["details"] == "User has 50 credits but needs 51"
            r = await gw.post("/api/unified/deduct-credits", json={"amount": 1})
            assert r.status_code == 422 and r.json()["error"] == "User ID required"
            r = await gw.post(
                "/api/unified/deduct-credits", json={"user_id": user_id, "amount": -3}
            )
            assert r.status_code == 422 and r.json()["success"] is False
            r = await gw.get("/api/unified/health")
            assert r.json()["success"] is True
