"""The catalog is data: seeded by the migration, edited by admins."""

from __future__ import annotations

import secrets

from services.kit.testing.plugin import principal_headers
from tests.ledger.billing.helpers import as_user, order
from tests.ledger.helpers import admin, penora

SEEDED = {
    "topup_10": (10, 100, None),
    "topup_25": (25, 300, None),
    "topup_50": (50, 500, None),
    "lite_monthly": (500, 2000, "month"),
    "lite_yearly": (3000, 12000, "year"),
    "pro_monthly": (1500, 5000, "month"),
    "pro_yearly": (9000, 30000, "year"),
    "studio_monthly": (5000, 15000, "month"),
    "studio_yearly": (30000, 90000, "year"),
}


class TestCatalog:
    async def test_seeded_items(self, ledger):
        r = await ledger.get("/v1/billing/catalog", headers=penora())
        assert r.status_code == 200, r.text
        items = {i["id"]: i for i in r.json()["items"]}
        for item_id, (credits, price, period) in SEEDED.items():
            item = items[item_id]
            assert (item["credits"], item["price"], item["period"]) == (credits, price, period)
            assert item["currency"] == "USD" and item["active"]
            assert item["kind"] == ("plan" if period else "topup")

    async def test_admin_edits_and_retires_an_item(self, ledger, razorpay, buyer):
        item_id = f"topup_test_{secrets.token_hex(3)}"
        body = {
            "kind": "topup",
            "name": "Test pack",
            "credits": 7.5,
            "price": 120,
            "currency": "USD",
        }
        r = await ledger.put(f"/v1/billing/catalog/{item_id}", json=body, headers=admin())
        assert r.status_code == 200, r.text
        assert r.json()["credits"] == 7.5 and r.json()["price"] == 120
        user = await buyer()
        placed = await order(ledger, user, item_id)
        assert placed["amount"] == 120 and placed["credits"] == 7.5
        r = await ledger.put(
            f"/v1/billing/catalog/{item_id}",
            json={**body, "price": 150, "active": False},
            headers=admin(),
        )
        assert r.status_code == 200 and not r.json()["active"]
        r = await ledger.post(
            "/v1/billing/orders", json={"user_id": user, "item": item_id}, headers=as_user(user)
        )
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_item"
        listed = (await ledger.get("/v1/billing/catalog", headers=penora())).json()["items"]
        assert item_id not in {i["id"] for i in listed}
        r = await ledger.get(
            "/v1/billing/catalog", params={"include_inactive": "true"}, headers=admin()
        )
        assert item_id in {i["id"] for i in r.json()["items"]}

    async def test_edits_are_admin_only_and_validated(self, ledger):
        body = {"kind": "topup", "name": "x", "credits": 1, "price": 100}
        writer = principal_headers("app", app="penora", scopes=("ledger:write", "ledger:grant"))
        r = await ledger.put("/v1/billing/catalog/topup_10", json=body, headers=writer)
        assert r.status_code == 403
        for bad, status in (
            ({**body, "kind": "plan"}, 422),  # a plan needs a period
            ({**body, "period": "month"}, 422),  # a top-up has none
            ({**body, "price": 0}, 422),
            ({**body, "credits": 0.0001}, 422),
            ({**body, "currency": "usd"}, 422),
        ):
            r = await ledger.put("/v1/billing/catalog/topup_new", json=bad, headers=admin())
            assert r.status_code == status, (bad, r.text)
        items = (await ledger.get("/v1/billing/catalog", headers=penora())).json()["items"]
        assert "topup_new" not in {i["id"] for i in items}
