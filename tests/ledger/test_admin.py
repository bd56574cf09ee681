"""The ledger's operator API (services/ledger/admin.py): admin only; a user's lots,
holds and debt; clawbacks with a reason (spent credit becomes debt); today's totals."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx

from services.kit.testing.plugin import principal_headers
from tests.ledger.helpers import admin, app_key, balance, key, penora


def granter() -> dict[str, str]:
    return principal_headers("app", app="billing", scopes=("ledger:grant",))


class TestAdminOnly:
    async def test_apps_and_granters_are_refused(
        self, ledger: httpx.AsyncClient, funded_user: Callable[..., Awaitable[str]]
    ):
        user = await funded_user(10)
        clawback = {
            "user_id": user,
            "amount": 1,
            "source": "promo",
            "grant_reference": "p",
            "reason": "test",
        }
        for headers in (penora(), granter()):
            assert (
                await ledger.get(f"/v1/ledger/admin/users/{user}", headers=headers)
            ).status_code == 403
            assert (
                await ledger.get("/v1/ledger/admin/overview", headers=headers)
            ).status_code == 403
            r = await ledger.post(
                "/v1/ledger/admin/clawbacks", json=clawback, headers={**headers, **key()}
            )
            assert r.status_code == 403
        assert (await balance(ledger, user))["available"] == 10


class TestUserLedger:
    async def test_lots_holds_and_debt(
        self, ledger: httpx.AsyncClient, funded_user: Callable[..., Awaitable[str]]
    ):
        user = await funded_user(10, expires_at="2099-01-01T00:00:00Z")
        r = await ledger.post(
            "/v1/ledger/holds",
            json={"user_id": user, "amount": 2, "app": "penora"},
            headers={**penora(), **key()},
        )
        assert r.status_code == 201, r.text
        r = await ledger.get(f"/v1/ledger/admin/users/{user}", headers=admin())
        assert r.status_code == 200, r.text
        body = r.json()
        [lot] = body["lots"]
        assert lot["source"] == "promo" and lot["amount"] == 10 and lot["remaining"] == 8
        assert lot["expires_at"].startswith("2099-01-01") and lot["expired"] is False
        [hold] = body["holds"]
        assert hold["status"] == "active" and hold["amount"] == 2 and hold["app"] == "penora"
        assert (body["balance"], body["held"], body["debt"]) == (8, 2, 0)
        missing = await ledger.get("/v1/ledger/admin/users/100000000000000000009", headers=admin())
        assert missing.status_code == 404

    async def test_clawback_with_reason_spent_part_becomes_debt(
        self, ledger: httpx.AsyncClient, funded_user: Callable[..., Awaitable[str]]
    ):
        user = await funded_user(10, reference="promo-1")
        r = await ledger.post(
            "/v1/ledger/debits",
            json={"user_id": user, "amount": 7, "app": "penora"},
            headers={**penora(), **key()},
        )
        assert r.status_code == 201, r.text
        clawback = {
            "user_id": user,
            "amount": 5,
            "source": "promo",
            "grant_reference": "promo-1",
            "reason": "granted twice",
        }
        headers = {**admin(), **key()}
        r = await ledger.post("/v1/ledger/admin/clawbacks", json=clawback, headers=headers)
        assert r.status_code == 201, r.text
        assert (r.json()["taken"], r.json()["debt_added"], r.json()["debt"]) == (3, 2, 2)
        again = await ledger.post("/v1/ledger/admin/clawbacks", json=clawback, headers=headers)
        assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
        assert (await balance(ledger, user))["available"] == 0
        detail = (await ledger.get(f"/v1/ledger/admin/users/{user}", headers=admin())).json()
        assert detail["debt"] == 2
        r = await ledger.get("/v1/ledger/transactions", params={"user_id": user}, headers=admin())
        assert r.json()["items"][0]["description"] == "granted twice"
        no_reason = {**clawback, "reason": ""}
        r = await ledger.post(
            "/v1/ledger/admin/clawbacks", json=no_reason, headers={**admin(), **key()}
        )
        assert r.status_code == 422


class TestOverview:
    async def test_today_and_series_move_with_activity(
        self, ledger: httpx.AsyncClient, funded_user: Callable[..., Awaitable[str]]
    ):
        before = (await ledger.get("/v1/ledger/admin/overview", headers=admin())).json()
        user = await funded_user(4)
        r = await ledger.post(
            "/v1/ledger/debits",
            json={"user_id": user, "amount": 1.5},
            headers={**app_key("overviewapp", "users:any"), **key()},
        )
        assert r.status_code == 201, r.text
        r = await ledger.get("/v1/ledger/admin/overview", params={"days": 30}, headers=admin())
        assert r.status_code == 200, r.text
        after = r.json()
        assert after["accounts"] == before["accounts"] + 1
        spent = {row["name"]: row["amount"] for row in after["spent_today"]}
        assert spent["overviewapp"] == 1.5
        issued = lambda doc: {row["name"]: row["amount"] for row in doc["issued_today"]}  # noqa: E731
        assert issued(after)["promo"] == issued(before).get("promo", 0) + 4
        assert len(after["days"]) == 30
        assert after["days"][-1]["spent"] == before["days"][-1]["spent"] + 1.5
