from __future__ import annotations

from tests.ledger.helpers import app_key, balance, key, operator, penora


async def charge(ledger, user, amount):
    r = await ledger.post(
        "/v1/ledger/debits", json={"user_id": user, "amount": amount}, headers={**penora(), **key()}
    )
    assert r.status_code == 201
    return r.json()["transaction_id"]


class TestRefunds:
    async def test_partial_then_rest_never_more(self, ledger, funded_user):
        user = await funded_user(10)
        tx = await charge(ledger, user, 6)
        r = await ledger.post(
            "/v1/ledger/refunds",
            json={"transaction_id": tx, "amount": 2},
            headers={**penora(), **key()},
        )
        assert r.status_code == 201 and r.json()["refundable"] == 4
        too_much = await ledger.post(
            "/v1/ledger/refunds",
            json={"transaction_id": tx, "amount": 4.001},
            headers={**penora(), **key()},
        )
        assert (
            too_much.status_code == 422
            and too_much.json()["error"]["code"] == "refund_exceeds_charge"
        )
        rest = await ledger.post(
            "/v1/ledger/refunds", json={"transaction_id": tx}, headers={**penora(), **key()}
        )
        assert rest.status_code == 201 and rest.json()["amount"] == 4
        none_left = await ledger.post(
            "/v1/ledger/refunds", json={"transaction_id": tx}, headers={**penora(), **key()}
        )
        assert none_left.status_code == 409
        assert (await balance(ledger, user))["available"] == 10

    async def test_refund_of_a_capture(self, ledger, funded_user):
        user = await funded_user(10)
        hold = (
            await ledger.post(
                "/v1/ledger/holds",
                json={"user_id": user, "amount": 5},
                headers={**penora(), **key()},
            )
        ).json()["hold"]["id"]
        cap = await ledger.post(
            f"/v1/ledger/holds/{hold}/capture", json={"amount": 3}, headers=penora()
        )
        r = await ledger.post(
            "/v1/ledger/refunds",
            json={"transaction_id": cap.json()["transaction_id"]},
            headers={**penora(), **key()},
        )
        assert r.status_code == 201 and r.json()["amount"] == 3
        assert (await balance(ledger, user))["available"] == 10

    async def test_other_apps_charges_and_grants_are_not_refundable(self, ledger, funded_user):
        from services.kit.testing.plugin import principal_headers

        user = await funded_user(10)
        tx = await charge(ledger, user, 2)
        other = principal_headers("app", app="imagegene", scopes=("ledger:write",))
        r = await ledger.post(
            "/v1/ledger/refunds", json={"transaction_id": tx}, headers={**other, **key()}
        )
        assert r.status_code == 403
        grants = await ledger.get(
            "/v1/ledger/transactions", params={"user_id": user, "kind": "grant"}, headers=operator()
        )
        r = await ledger.post(
            "/v1/ledger/refunds",
            json={"transaction_id": grants.json()["items"][0]["id"]},
            headers={**operator(), **key()},
        )
        assert r.status_code == 422 and r.json()["error"]["code"] == "not_refundable"
        r = await ledger.post(
            "/v1/ledger/refunds", json={"transaction_id": 10**12}, headers={**operator(), **key()}
        )
        assert r.status_code == 404
        assert (await balance(ledger, user))["available"] == 8


class TestTransactionsAndUsage:
    async def test_usage_without_a_group_is_the_total(self, ledger, funded_user):
        # Found by schemathesis: `group_by=` summed no rows to NULL, a 500.
        user = await funded_user(10)
        nothing = await ledger.get(
            "/v1/ledger/usage", params={"user_id": user, "group_by": ""}, headers=penora()
        )
        assert nothing.status_code == 200, nothing.text
        assert nothing.json()["rows"] == [{"app": None, "day": None, "spent": 0, "charges": 0}]
        await charge(ledger, user, 2.5)
        total = await ledger.get(
            "/v1/ledger/usage", params={"user_id": user, "group_by": ""}, headers=penora()
        )
        assert total.json()["rows"] == [{"app": None, "day": None, "spent": 2.5, "charges": 1}]
        assert total.json()["total_spent"] == 2.5

    async def test_filters_pagination_and_usage(self, ledger, funded_user):
        user = await funded_user(100)
        for app, amount in [("penora", 1), ("imagegene", 2), ("penora", 3), ("imagegene", 4)]:
            r = await ledger.post(
                "/v1/ledger/debits",
                json={"user_id": user, "amount": amount, "app": app},
                headers={**app_key(app), **key()},
            )
            assert r.status_code == 201
        page1 = await ledger.get(
            "/v1/ledger/transactions",
            params={"user_id": user, "kind": "debit", "limit": 3},
            headers=operator(),
        )
        body = page1.json()
        assert [t["amount"] for t in body["items"]] == [4, 3, 2]
        page2 = await ledger.get(
            "/v1/ledger/transactions",
            params={"user_id": user, "kind": "debit", "limit": 3, "cursor": body["next_cursor"]},
            headers=operator(),
        )
        assert [t["amount"] for t in page2.json()["items"]] == [1] and page2.json()[
            "next_cursor"
        ] is None
        ig = await ledger.get(
            "/v1/ledger/transactions",
            params={"user_id": user, "app": "imagegene"},
            headers=operator(),
        )
        assert [t["delta"] for t in ig.json()["items"]] == [-4, -2]
        usage = await ledger.get(
            "/v1/ledger/usage", params={"user_id": user, "group_by": "app,day"}, headers=operator()
        )
        rows = {r["app"]: r for r in usage.json()["rows"]}
        assert rows["penora"]["spent"] == 4 and rows["imagegene"]["spent"] == 6
        assert rows["penora"]["charges"] == 2 and usage.json()["total_spent"] == 10
        bad = await ledger.get(
            "/v1/ledger/usage", params={"user_id": user, "group_by": "planet"}, headers=operator()
        )
        assert bad.status_code == 400
        bad = await ledger.get(
            "/v1/ledger/transactions", params={"user_id": user, "cursor": "!!"}, headers=operator()
        )
        assert bad.status_code == 400
