"""The old clients' `/api/unified/*` contract through the gateway."""

from __future__ import annotations

import httpx

from tests.gateway.helpers import new_user_id


async def create_user(gw: httpx.AsyncClient, key: str, user_id: str) -> httpx.Response:
    return await gw.post(
        "/api/unified/create-user",
        json={"user_id": user_id, "username": "Test User", "email": f"{user_id}@example.com"},
        headers={"X-API-Key": key},
    )


class TestIntegrationFlow:
    async def test_create_info_deduct_transactions(self, gw: httpx.AsyncClient, app_key: str):
        user_id = new_user_id()
        r = await create_user(gw, app_key, user_id)
        assert r.status_code == 201, r.text
        assert r.json()["success"] is True
        r = await gw.get(
            "/api/unified/user-info", params={"user_id": user_id}, headers={"X-API-Key": app_key}
        )
        assert r.status_code == 200, r.text
        info = r.json()
        assert info["success"] is True and info["credits"] == 50
        assert info["storage"]["used_mb"] == 0
        r = await gw.post(
            "/api/unified/deduct-credits",
            json={
                "user_id": user_id,
                "amount": 5,
                "app_name": "imagegene",
                "description": "AI image generation",
                "project_code": "img_xyz123",
            },
            headers={"X-API-Key": app_key},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["success"] is True
        assert body["credits_deducted"] == 5 and body["new_balance"] == 45
        assert body["app_name"] == "imagegene"
        r = await gw.get(
            "/api/unified/transactions", params={"user_id": user_id}, headers={"X-API-Key": app_key}
        )
        assert r.status_code == 200, r.text
        tx = r.json()
        assert tx["success"] is True
        assert [t["amount"] for t in tx["imagegene_transactions"]] == [5]
        assert tx["penora_transactions"] == []
        assert tx["total_count"] == len(tx["all_transactions"]) >= 2


class TestDeductIdempotency:
    async def test_project_code_is_per_user_and_retries_replay(
        self, gw: httpx.AsyncClient, app_key: str
    ):
        headers = {"X-API-Key": app_key}
        balances = []
        for user_id in (new_user_id(), new_user_id()):
            assert (await create_user(gw, app_key, user_id)).status_code == 201
            for _ in range(2):  # the retry replays: one charge
                r = await gw.post(
                    "/api/unified/deduct-credits",
                    headers=headers,
                    json={"user_id": user_id, "amount": 2.5, "project_code": "shared-code"},
                )
                assert r.status_code == 200, r.text
            balances.append(r.json()["new_balance"])
        assert balances == [47.5, 47.5]


class TestUnparsableBody:
    async def test_a_body_that_is_not_text_answers_in_the_old_shape(
        self, gw: httpx.AsyncClient, app_key: str
    ):
        # Found by schemathesis: FastAPI's own 400 escaped the compat route's error shape.
        r = await gw.post(
            "/api/unified/deduct-credits",
            content=b"\xff\xfe)",
            headers={"X-API-Key": app_key, "Content-Type": "application/json"},
        )
        assert r.status_code == 400, r.text
        assert r.json() == {
            "success": False,
            "error": "There was an error parsing the body",
            "code": "bad_request",
        }
