"""POST /v1/ledger/batch: many operations in one request, each under the same rules,
authority and idempotency as its single route, answered one by one."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx

from services.kit.db import plain_url
from services.kit.testing.plugin import principal_headers
from services.ledger.verify import verify
from tests.ledger.helpers import app_key, balance, key, operator, penora


def item(op: str, **fields: Any) -> dict[str, Any]:
    return {"op": op, "idempotency_key": uuid.uuid4().hex, **fields}


async def batch(
    ledger: httpx.AsyncClient, items: list[dict[str, Any]], headers: dict[str, str] | None = None
) -> httpx.Response:
    return await ledger.post(
        "/v1/ledger/batch", json={"operations": items}, headers=headers or penora()
    )


def statuses(r: httpx.Response) -> list[int]:
    assert r.status_code == 200, r.text
    return [res["status"] for res in r.json()["results"]]


class TestMixed:
    async def test_successes_and_failures_side_by_side(self, ledger, funded_user, new_user_id):
        rich, poor = await funded_user(50), await funded_user(3)
        hold_user = await funded_user(20)
        items = [
            item("debit", user_id=rich, amount=4, description="tokens"),
            item("debit", user_id=poor, amount=3.5),  # 402
            item("debit", user_id=new_user_id(), amount=1),  # 404: no account
            item("hold", user_id=hold_user, amount=12.5, ttl_seconds=300),
            item("grant", user_id=rich, amount=5, source="promo"),  # 403: no ledger:grant
            item("debit", user_id=rich, amount=0.25),
        ]
        r = await batch(ledger, items)
        assert statuses(r) == [201, 402, 404, 201, 403, 201]
        out = r.json()
        assert out["succeeded"] == 3 and out["failed"] == 3
        results = out["results"]
        assert [res["index"] for res in results] == list(range(6))
        assert results[0]["body"]["amount"] == 4 and results[0]["body"]["app"] == "penora"
        assert results[1]["error"]["code"] == "insufficient_credits"
        assert results[1]["error"]["detail"]["available"] == 3
        assert results[2]["error"]["code"] == "unknown_user"
        assert results[3]["body"]["hold"]["amount"] == 12.5
        assert results[3]["body"]["hold"]["status"] == "active"
        assert results[4]["error"]["code"] == "missing_scope"
        assert "body" not in results[4]
        assert (await balance(ledger, rich))["available"] == 45.75
        assert (await balance(ledger, poor))["available"] == 3
        hb = await balance(ledger, hold_user)
        assert hb["available"] == 7.5 and hb["held"] == 12.5

    async def test_item_bodies_are_the_single_routes_shapes(self, ledger, funded_user):
        user = await funded_user(30)
        single = await ledger.post(
            "/v1/ledger/debits",
            json={"user_id": user, "amount": 1},
            headers={**penora(), **key()},
        )
        assert single.status_code == 201
        hold = await ledger.post(
            "/v1/ledger/holds",
            json={"user_id": user, "amount": 5},
            headers={**penora(), **key()},
        )
        other = await ledger.post(
            "/v1/ledger/holds",
            json={"user_id": user, "amount": 2},
            headers={**penora(), **key()},
        )
        hold_id, other_id = hold.json()["hold"]["id"], other.json()["hold"]["id"]
        r = await batch(
            ledger,
            [
                item("debit", user_id=user, amount=1),
                item("capture", hold_id=hold_id, amount=3),
                item("release", hold_id=other_id),
                item("refund", transaction_id=single.json()["transaction_id"], amount=0.5),
                item("capture", hold_id=str(uuid.uuid4())),
            ],
        )
        assert statuses(r) == [201, 200, 200, 201, 404]
        res = r.json()["results"]
        assert set(res[0]["body"]) == set(single.json())
        assert set(res[1]["body"]) == set(hold.json())
        assert res[1]["body"]["hold"]["status"] == "captured"
        assert res[1]["body"]["hold"]["captured"] == 3
        assert res[2]["body"]["hold"]["status"] == "released"
        assert res[3]["body"]["refund_of"] == single.json()["transaction_id"]
        assert res[4]["error"]["code"] == "hold_not_found"
        # 30 - 1 - 1 - 3 (captured) + 0.5 (refund) = 25.5
        b = await balance(ledger, user)
        assert b["available"] == 25.5 and b["held"] == 0

    async def test_an_item_with_text_the_edge_refuses_fails_the_batch_before_anything(
        self, ledger, funded_user
    ):
        # A NUL byte never reaches the database: the body is malformed, so the whole batch
        # is a 422 naming the item, and nothing is applied. (Items the database itself
        # refuses fail alone: tests/ledger/test_batcher.py drives the committer directly.)
        user = await funded_user(10)
        r = await batch(
            ledger,
            [
                item("debit", user_id=user, amount=1),
                item("debit", user_id=user, amount=1, description="nul \u0000 byte"),
                item("debit", user_id=user, amount=1),
            ],
        )
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_text"
        assert error["detail"]["errors"][0]["loc"][:3] == ["body", "operations", "1"]
        assert (await balance(ledger, user))["available"] == 10


class TestIdempotency:
    async def test_the_same_batch_again_applies_nothing_twice(self, ledger, funded_user):
        user = await funded_user(10)
        items = [item("debit", user_id=user, amount=2) for _ in range(3)]
        items.append(item("debit", user_id=user, amount=100))
        first = await batch(ledger, items)
        again = await batch(ledger, items)
        assert statuses(first) == statuses(again) == [201, 201, 201, 402]
        assert [res["replayed"] for res in again.json()["results"]] == [True] * 4
        for a, b in zip(first.json()["results"], again.json()["results"], strict=True):
            assert a.get("body") == b.get("body") and a.get("error") == b.get("error")
        assert (await balance(ledger, user))["available"] == 4

    async def test_a_batch_key_replays_the_first_answer(self, ledger, funded_user):
        user = await funded_user(10)
        items = [item("debit", user_id=user, amount=3), item("debit", user_id=user, amount=9)]
        batch_key = {**penora(), **key()}
        first = await batch(ledger, items, batch_key)
        assert statuses(first) == [201, 402]
        again = await batch(ledger, items, {**batch_key, **penora()})
        assert again.status_code == 200
        assert again.headers.get("idempotent-replayed") == "true"
        assert again.json() == first.json()
        other = [item("debit", user_id=user, amount=1)]
        reused = await batch(ledger, other, {**batch_key, **penora()})
        assert reused.status_code == 409
        assert reused.json()["error"]["code"] == "idempotency_key_reused"
        assert (await balance(ledger, user))["available"] == 7

    async def test_an_item_key_reused_with_other_terms_is_409_for_that_item_only(
        self, ledger, funded_user
    ):
        user = await funded_user(10)
        shared = item("debit", user_id=user, amount=1)
        assert statuses(await batch(ledger, [shared])) == [201]
        changed = {**shared, "amount": 2}
        r = await batch(ledger, [item("debit", user_id=user, amount=1), changed])
        assert statuses(r) == [201, 409]
        assert r.json()["results"][1]["error"]["code"] == "idempotency_key_reused"
        assert (await balance(ledger, user))["available"] == 8

    async def test_an_item_key_is_the_single_routes_key(self, ledger, funded_user):
        user = await funded_user(10)
        one = item("debit", user_id=user, amount=2)
        single = await ledger.post(
            "/v1/ledger/debits",
            json={"user_id": user, "amount": 2},
            headers={**penora(), "Idempotency-Key": one["idempotency_key"]},
        )
        assert single.status_code == 201
        r = await batch(ledger, [one])
        assert statuses(r) == [201]
        assert r.json()["results"][0]["replayed"] is True
        assert r.json()["results"][0]["body"]["transaction_id"] == single.json()["transaction_id"]
        assert (await balance(ledger, user))["available"] == 8


class TestAuthority:
    async def test_a_user_tokens_items_are_each_403(self, ledger, funded_user):
        user = await funded_user(10)
        token = principal_headers("user", app="penora", user_id=user, scopes=())
        r = await batch(
            ledger,
            [item("debit", user_id=user, amount=1), item("hold", user_id=user, amount=1)],
            token,
        )
        assert statuses(r) == [403, 403]
        assert {res["error"]["code"] for res in r.json()["results"]} == {"forbidden"}
        assert (await balance(ledger, user))["available"] == 10

    async def test_an_item_in_another_apps_lane_is_403_alone(self, ledger, funded_user):
        user = await funded_user(10)
        r = await batch(
            ledger,
            [
                item("debit", user_id=user, amount=1, app="imagegene"),
                item("debit", user_id=user, amount=1, app="penora"),
            ],
            app_key("penora"),
        )
        assert statuses(r) == [403, 201]
        assert r.json()["results"][0]["error"]["code"] == "wrong_app"
        assert (await balance(ledger, user))["available"] == 9

    async def test_a_partner_reaches_only_linked_users(self, ledger, funded_user):
        user = await funded_user(10)
        r = await batch(ledger, [item("debit", user_id=user, amount=1)], app_key("partnerz"))
        assert statuses(r) == [403]
        assert r.json()["results"][0]["error"]["code"] == "user_not_linked"

    async def test_another_apps_hold_is_not_yours_to_capture(self, ledger, funded_user):
        user = await funded_user(10)
        hold = await ledger.post(
            "/v1/ledger/holds", json={"user_id": user, "amount": 4}, headers={**penora(), **key()}
        )
        hold_id = hold.json()["hold"]["id"]
        r = await batch(ledger, [item("capture", hold_id=hold_id)], app_key("imagegene"))
        assert statuses(r) == [403]
        assert r.json()["results"][0]["error"]["code"] == "not_your_hold"


class TestLimits:
    async def test_repeated_item_keys_and_oversized_batches_are_refused_whole(
        self, ledger, funded_user
    ):
        user = await funded_user(10)
        one = item("debit", user_id=user, amount=1)
        r = await batch(ledger, [one, {**one, "amount": 2}])
        assert r.status_code == 422 and r.json()["error"]["code"] == "duplicate_item_key"
        r = await batch(ledger, [item("debit", user_id=user, amount=1) for _ in range(1001)])
        assert r.status_code == 422
        r = await batch(ledger, [])
        assert r.status_code == 422
        r = await batch(ledger, [{"op": "debit", "user_id": user, "amount": 1}])  # no key
        assert r.status_code == 422
        r = await batch(ledger, [item("debit", user_id=user, amount=1), item("teleport")])
        assert r.status_code == 422
        assert (await balance(ledger, user))["available"] == 10

    async def test_a_thousand_items_apply(self, ledger, funded_user):
        users = [await funded_user(1) for _ in range(4)]
        r = await batch(
            ledger, [item("debit", user_id=users[i % 4], amount=0.004) for i in range(1000)]
        )
        assert statuses(r) == [201] * 1000
        for user in users:
            assert (await balance(ledger, user))["available"] == 0


class TestConcurrency:
    async def test_a_batch_across_500_users_under_single_debits(
        self, ledger, new_user_id, ku_database_url
    ):
        users = [new_user_id() for _ in range(500)]
        gate = asyncio.Semaphore(16)

        async def open_account(u: str) -> httpx.Response:
            async with gate:
                return await ledger.post(
                    "/v1/ledger/accounts", json={"user_id": u, "welcome": False}, headers=operator()
                )

        opened = await asyncio.gather(*(open_account(u) for u in users))
        assert {r.status_code for r in opened} == {201}
        grants = [item("grant", user_id=u, amount=10, source="promo") for u in users]
        assert statuses(await batch(ledger, grants, operator())) == [201] * 500

        # Each user can afford one 6 Ku debit: one from the batch or one single, never both.
        async def single(u: str) -> int:
            r = await ledger.post(
                "/v1/ledger/debits",
                json={"user_id": u, "amount": 6},
                headers={**penora(), **key()},
            )
            return r.status_code

        debits = [item("debit", user_id=u, amount=6) for u in users]
        singles = [single(u) for u in users]
        batched, *single_codes = await asyncio.gather(batch(ledger, debits), *singles)
        batch_codes = statuses(batched)
        for u, b, s in zip(users, batch_codes, single_codes, strict=True):
            assert sorted([b, s]) == [201, 402], (u, b, s)
        for u in users[:25]:
            bal = await balance(ledger, u)
            assert bal["available"] == 4 and bal["held"] == 0
        assert await verify(plain_url(ku_database_url)) == []
