from __future__ import annotations

import asyncio
import uuid

from tests.ledger.helpers import balance, imagegene, key, operator, penora


class TestIdempotencyKey:
    async def test_ten_sequential_replays_one_effect(self, ledger, funded_user):
        user = await funded_user(50)
        headers = {**penora(), "Idempotency-Key": uuid.uuid4().hex}
        payload = {"user_id": user, "amount": 2.5, "app": "penora"}
        responses = [
            await ledger.post("/v1/ledger/debits", json=payload, headers=headers) for _ in range(10)
        ]
        assert {r.status_code for r in responses} == {201}
        assert all(r.json() == responses[0].json() for r in responses)
        assert [r.headers.get("idempotent-replayed") for r in responses[1:]] == ["true"] * 9
        assert (await balance(ledger, user))["available"] == 47.5

    async def test_ten_concurrent_duplicates_one_effect(self, ledger, funded_user):
        user = await funded_user(50)
        headers = {**penora(), "Idempotency-Key": uuid.uuid4().hex}
        payload = {"user_id": user, "amount": 3, "app": "penora"}
        responses = await asyncio.gather(
            *(ledger.post("/v1/ledger/debits", json=payload, headers=headers) for _ in range(10))
        )
        assert {r.status_code for r in responses} == {201}
        assert len({r.json()["transaction_id"] for r in responses}) == 1
        assert (await balance(ledger, user))["available"] == 47
        txs = await ledger.get(
            "/v1/ledger/transactions", params={"user_id": user, "kind": "debit"}, headers=operator()
        )
        assert len(txs.json()["items"]) == 1

    async def test_same_key_other_amount_is_409(self, ledger, funded_user):
        user = await funded_user(50)
        headers = {**penora(), "Idempotency-Key": uuid.uuid4().hex}
        first = await ledger.post(
            "/v1/ledger/debits", json={"user_id": user, "amount": 1}, headers=headers
        )
        assert first.status_code == 201
        again = await ledger.post(
            "/v1/ledger/debits", json={"user_id": user, "amount": 2}, headers=headers
        )
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "idempotency_key_reused"
        assert (await balance(ledger, user))["available"] == 49

    async def test_natural_reference_dedupes_without_header(self, ledger, funded_user):
        user = await funded_user(50)
        payload = {"user_id": user, "amount": 5, "app": "imagegene", "reference": "IMG123"}
        results = await asyncio.gather(
            *(ledger.post("/v1/ledger/debits", json=payload, headers=imagegene()) for _ in range(5))
        )
        assert {r.status_code for r in results} == {201}
        assert (await balance(ledger, user))["available"] == 45

    async def test_first_failure_is_the_answer_for_good(self, ledger, funded_user):
        """Stripe's rule: a 402 is stored like a success. The same request replays it
        (even once credit arrived: send a new key for a new attempt); the same key with
        another amount is 409."""
        user = await funded_user(1)
        headers = {**penora(), "Idempotency-Key": uuid.uuid4().hex}
        payload = {"user_id": user, "amount": 5}
        first = await ledger.post("/v1/ledger/debits", json=payload, headers=headers)
        assert first.status_code == 402
        other = await ledger.post(
            "/v1/ledger/debits", json={"user_id": user, "amount": 0.5}, headers=headers
        )
        assert other.status_code == 409, other.text
        assert other.json()["error"]["code"] == "idempotency_key_reused"
        r = await ledger.post(
            "/v1/ledger/grants",
            json={"user_id": user, "amount": 10, "source": "purchase", "reference": "p1"},
            headers=operator(),
        )
        assert r.status_code == 201, r.text
        again = await ledger.post("/v1/ledger/debits", json=payload, headers=headers)
        assert again.status_code == 402
        assert again.headers.get("idempotent-replayed") == "true"
        assert again.json()["error"] == first.json()["error"]
        assert (await balance(ledger, user))["available"] == 11

    async def test_new_header_key_same_reference_other_params_is_409(self, ledger, funded_user):
        """A header key no longer silently wins over the natural reference: both are
        checked, and the outcome is stored under both."""
        user = await funded_user(20)
        payload = {"user_id": user, "amount": 2, "reference": "order-7"}
        first = await ledger.post("/v1/ledger/debits", json=payload, headers={**penora(), **key()})
        assert first.status_code == 201, first.text
        same = await ledger.post("/v1/ledger/debits", json=payload, headers={**penora(), **key()})
        assert same.status_code == 201
        assert same.json()["transaction_id"] == first.json()["transaction_id"]
        other = await ledger.post(
            "/v1/ledger/debits", json={**payload, "amount": 3}, headers={**penora(), **key()}
        )
        assert other.status_code == 409, other.text
        assert other.json()["error"]["code"] == "idempotency_key_reused"
        assert (await balance(ledger, user))["available"] == 18

    async def test_header_key_reused_with_new_reference_is_409(self, ledger, funded_user):
        user = await funded_user(20)
        headers = {**penora(), **key()}
        first = await ledger.post(
            "/v1/ledger/debits",
            json={"user_id": user, "amount": 2, "reference": "a"},
            headers=headers,
        )
        assert first.status_code == 201
        second = await ledger.post(
            "/v1/ledger/debits",
            json={"user_id": user, "amount": 2, "reference": "b"},
            headers=headers,
        )
        assert second.status_code == 409
        assert (await balance(ledger, user))["available"] == 18

    async def test_same_reference_for_two_users_is_two_charges(self, ledger, funded_user):
        alice, bob = await funded_user(10), await funded_user(10)
        for user in (alice, bob):
            r = await ledger.post(
                "/v1/ledger/debits",
                json={"user_id": user, "amount": 1, "reference": "shared-ref"},
                headers=penora(),
            )
            assert r.status_code == 201, r.text
        assert (await balance(ledger, alice))["available"] == 9
        assert (await balance(ledger, bob))["available"] == 9
