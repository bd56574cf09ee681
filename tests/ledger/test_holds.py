from __future__ import annotations

import asyncio

from tests.ledger.helpers import balance, key, operator, penora


async def reserve(ledger, user, amount, ttl=300):
    r = await ledger.post(
        "/v1/ledger/holds",
        json={"user_id": user, "amount": amount, "ttl_seconds": ttl},
        headers={**penora(), **key()},
    )
    assert r.status_code == 201, r.text
    return r.json()["hold"]["id"]


class TestHoldLifecycle:
    async def test_reserve_moves_credit_to_held(self, ledger, funded_user):
        user = await funded_user(20)
        await reserve(ledger, user, 8)
        b = await balance(ledger, user)
        assert (b["available"], b["held"], b["total"]) == (12, 8, 20)

    async def test_partial_capture_returns_the_rest(self, ledger, funded_user):
        user = await funded_user(20)
        hold = await reserve(ledger, user, 8)
        r = await ledger.post(
            f"/v1/ledger/holds/{hold}/capture", json={"amount": 2.75}, headers=penora()
        )
        assert r.status_code == 200, r.text
        assert r.json()["hold"]["status"] == "captured" and r.json()["hold"]["captured"] == 2.75
        b = await balance(ledger, user)
        assert (b["available"], b["held"]) == (17.25, 0)

    async def test_capture_without_body_takes_all(self, ledger, funded_user):
        user = await funded_user(5)
        hold = await reserve(ledger, user, 5)
        r = await ledger.post(f"/v1/ledger/holds/{hold}/capture", headers=penora())
        assert r.status_code == 200 and r.json()["hold"]["captured"] == 5
        assert (await balance(ledger, user))["total"] == 0

    async def test_reserve_beyond_available_is_402(self, ledger, funded_user):
        user = await funded_user(5)
        await reserve(ledger, user, 4)
        r = await ledger.post(
            "/v1/ledger/holds", json={"user_id": user, "amount": 2}, headers={**penora(), **key()}
        )
        assert r.status_code == 402 and r.json()["error"]["detail"]["available"] == 1

    async def test_capture_more_than_held_is_422(self, ledger, funded_user):
        user = await funded_user(20)
        hold = await reserve(ledger, user, 5)
        r = await ledger.post(
            f"/v1/ledger/holds/{hold}/capture", json={"amount": 5.001}, headers=penora()
        )
        assert r.status_code == 422 and r.json()["error"]["code"] == "capture_exceeds_hold"
        b = await balance(ledger, user)
        assert (b["available"], b["held"]) == (15, 5)

    async def test_capture_after_expiry_is_409(self, ledger, funded_user):
        user = await funded_user(20)
        hold = await reserve(ledger, user, 5, ttl=1)
        await asyncio.sleep(1.2)
        # Before any job runs, the expired hold already counts as released.
        b = await balance(ledger, user)
        assert (b["available"], b["held"]) == (20, 0)
        r = await ledger.post(f"/v1/ledger/holds/{hold}/capture", headers=penora())
        assert r.status_code == 409 and r.json()["error"]["code"] == "hold_expired"
        again = await ledger.post(f"/v1/ledger/holds/{hold}/release", headers=penora())
        assert again.status_code == 200 and again.json()["hold"]["status"] == "expired"
        assert (await balance(ledger, user))["available"] == 20

    async def test_resolving_again_returns_the_first_outcome(self, ledger, funded_user):
        user = await funded_user(20)
        hold = await reserve(ledger, user, 5)
        first = await ledger.post(
            f"/v1/ledger/holds/{hold}/capture", json={"amount": 3}, headers=penora()
        )
        again = await ledger.post(
            f"/v1/ledger/holds/{hold}/capture", json={"amount": 3}, headers=penora()
        )
        assert again.status_code == 200
        assert again.json()["hold"] == first.json()["hold"]
        other = await ledger.post(f"/v1/ledger/holds/{hold}/release", headers=penora())
        assert other.status_code == 409 and other.json()["error"]["code"] == "hold_already_captured"
        assert (await balance(ledger, user))["available"] == 17

    async def test_unknown_hold_is_404(self, ledger):
        r = await ledger.post(
            "/v1/ledger/holds/00000000-0000-0000-0000-000000000000/release", headers=penora()
        )
        assert r.status_code == 404
        r = await ledger.post("/v1/ledger/holds/not-a-uuid/release", headers=penora())
        assert r.status_code == 404


class TestCaptureReleaseRace:
    async def test_exactly_one_wins_each_time(self, ledger, funded_user):
        user = await funded_user(100)
        for _ in range(100):
            hold = await reserve(ledger, user, 1)
            cap, rel = await asyncio.gather(
                ledger.post(f"/v1/ledger/holds/{hold}/capture", headers=penora()),
                ledger.post(f"/v1/ledger/holds/{hold}/release", headers=penora()),
            )
            codes = sorted([cap.status_code, rel.status_code])
            assert codes == [200, 409], (cap.text, rel.text)
        txs = await ledger.get(
            "/v1/ledger/transactions", params={"user_id": user, "limit": 200}, headers=operator()
        )
        kinds = [t["kind"] for t in txs.json()["items"]]
        assert kinds.count("capture") + kinds.count("release") == 100
        b = await balance(ledger, user)
        assert b["held"] == 0
        assert b["available"] == 100 - kinds.count("capture")
