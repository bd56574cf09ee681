from __future__ import annotations

import asyncio

import httpx

from tests.ledger.helpers import app_key, balance, key, operator, penora


async def debit(ledger: httpx.AsyncClient, user_id: str, amount: object, **extra: object):
    caller = app_key(str(extra.get("app") or "penora"))
    return await ledger.post(
        "/v1/ledger/debits",
        json={"user_id": user_id, "amount": amount, **extra},
        headers={**caller, **key()},
    )


class TestDebit:
    async def test_debit_reduces_balance_and_records_app(self, ledger, funded_user):
        user = await funded_user(50)
        r = await debit(ledger, user, 5, app="imagegene", description="1024x1024")
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["amount"] == 5 and body["available"] == 45 and body["app"] == "imagegene"
        assert (await balance(ledger, user))["available"] == 45

    async def test_fractional_amounts_are_exact(self, ledger, funded_user):
        user = await funded_user(1)
        for _ in range(10):
            assert (await debit(ledger, user, 0.1)).status_code == 201
        b = await balance(ledger, user)
        assert b["available"] == 0 and b["total"] == 0

    async def test_insufficient_credits_is_402_with_available(self, ledger, funded_user):
        user = await funded_user(3)
        r = await debit(ledger, user, 3.5)
        assert r.status_code == 402
        err = r.json()["error"]
        assert err["code"] == "insufficient_credits"
        assert err["detail"]["available"] == 3
        assert (await balance(ledger, user))["available"] == 3


class TestConcurrentDebits:
    async def test_200_concurrent_debits_against_50(self, ledger, funded_user):
        user = await funded_user(50)
        results = await asyncio.gather(*(debit(ledger, user, 1) for _ in range(200)))
        codes = [r.status_code for r in results]
        assert codes.count(201) == 50
        assert codes.count(402) == 150
        b = await balance(ledger, user)
        assert b["available"] == 0 and b["held"] == 0


class TestBadInput:
    async def test_rejections_write_nothing(self, ledger, funded_user):
        user = await funded_user(10)
        cases = [
            ({"user_id": user, "amount": -1}, 422),
            ({"user_id": user, "amount": 0}, 422),
            ({"user_id": user, "amount": 1.0005}, 422),
            ({"user_id": user, "amount": "abc"}, 422),
            ({"user_id": user, "amount": True}, 422),
            ({"user_id": user}, 422),
            ({"amount": 1}, 422),
            ({"user_id": user, "amount": 1, "surprise": 1}, 422),
            ({"user_id": "unknown-" + user, "amount": 1}, 404),
        ]
        for payload, status in cases:
            r = await ledger.post("/v1/ledger/debits", json=payload, headers={**penora(), **key()})
            assert r.status_code == status, (payload, r.text)
            assert "code" in r.json()["error"]
        r = await ledger.post(
            "/v1/ledger/debits",
            content=b'{"user_id": ',
            headers={**penora(), **key(), "content-type": "application/json"},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json"
        r = await ledger.post(
            "/v1/ledger/debits", json={"user_id": user, "amount": 1}, headers=penora()
        )
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "idempotency_key_required"
        txs = await ledger.get(
            "/v1/ledger/transactions", params={"user_id": user}, headers=operator()
        )
        assert [t["kind"] for t in txs.json()["items"]] == ["grant"]
        assert (await balance(ledger, user))["available"] == 10

    async def test_missing_scope_and_principal(self, ledger, funded_user):
        from services.kit.testing.plugin import principal_headers

        user = await funded_user(10)
        reader = principal_headers("app", app="penora", scopes=("ledger:read",))
        r = await ledger.post(
            "/v1/ledger/debits", json={"user_id": user, "amount": 1}, headers={**reader, **key()}
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "missing_scope"
        r = await ledger.post(
            "/v1/ledger/debits", json={"user_id": user, "amount": 1}, headers=key()
        )
        assert r.status_code == 401
        forged = {"x-ku-principal": penora()["x-ku-principal"][:-4] + "AAAA"}
        r = await ledger.post(
            "/v1/ledger/debits", json={"user_id": user, "amount": 1}, headers={**forged, **key()}
        )
        assert r.status_code == 401
        assert (await balance(ledger, user))["available"] == 10

    async def test_user_token_cannot_touch_another_user(self, ledger, funded_user):
        from services.kit.testing.plugin import principal_headers

        alice, bob = await funded_user(10), await funded_user(10)
        as_alice = principal_headers(
            "user", app="penora", user_id=alice, scopes=("ledger:read", "ledger:write")
        )
        r = await ledger.get("/v1/ledger/balance", params={"user_id": bob}, headers=as_alice)
        assert r.status_code == 403
        r = await ledger.post(
            "/v1/ledger/debits", json={"user_id": bob, "amount": 1}, headers={**as_alice, **key()}
        )
        assert r.status_code == 403
        assert (await balance(ledger, bob))["available"] == 10


class TestHotPath:
    """The hot routes' fast path (`HotRoute`, a well-formed `application/json` body) and
    FastAPI's handler (any other content type, or a body that fails) answer alike."""

    async def test_fast_path_and_fallback_share_idempotency_and_errors(self, ledger, funded_user):
        user = await funded_user(10)
        k = key()
        payload = b'{"user_id": "%s", "amount": 1.5}' % user.encode()
        fast = {**penora(), **k, "content-type": "application/json"}
        slow = {**penora(), **k, "content-type": "application/json; charset=utf-8"}
        first = await ledger.post("/v1/ledger/debits", content=payload, headers=fast)
        assert first.status_code == 201, first.text
        assert "idempotent-replayed" not in first.headers
        again = await ledger.post("/v1/ledger/debits", content=payload, headers=slow)
        assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
        assert again.json() == first.json()
        other = b'{"user_id": "%s", "amount": 2}' % user.encode()
        for headers in (fast, slow):
            r = await ledger.post("/v1/ledger/debits", content=other, headers=headers)
            assert r.status_code == 409, r.text
            assert r.json()["error"]["code"] == "idempotency_key_reused"
        # Without a principal: 401 first, whether the body validates or not.
        for body in (payload, b'{"amount": -1}'):
            r = await ledger.post(
                "/v1/ledger/debits", content=body, headers={"content-type": "application/json"}
            )
            assert r.status_code == 401, r.text
        assert (await balance(ledger, user))["available"] == 8.5

    async def test_balance_fast_path_and_fallback(self, ledger, funded_user):
        user = await funded_user(4)
        url = "/v1/ledger/balance"
        r = await ledger.get(url, params={"user_id": user}, headers=operator())
        assert r.status_code == 200 and r.json()["available"] == 4, r.text
        for params in ({}, {"user_id": "not a user id!"}):
            r = await ledger.get(url, params=params, headers=operator())
            assert r.status_code == 422, r.text
        for params in ({"user_id": user}, {}):
            assert (await ledger.get(url, params=params)).status_code == 401

    async def test_hot_requests_are_answered_in_front_of_fastapi(
        self, ledger, funded_user, monkeypatch
    ):
        """The ledger's `FrontApp` answers a well-formed hot request through the route's
        `fast` without FastAPI's stack; a declined one (another content type) goes
        through FastAPI with its body replayed; each is counted once in the metrics."""
        from services.kit.metrics import REQUESTS
        from services.ledger.api import routers

        route = next(r for r in routers[0].routes if getattr(r, "path", "") == "/v1/ledger/debits")
        calls = []
        original = route.fast

        async def counting(request):
            calls.append(request.headers.get("content-type"))
            return await original(request)

        monkeypatch.setattr(route, "fast", counting)
        user = await funded_user(10)
        count = REQUESTS.labels("ledger", "POST", "/v1/ledger/debits", "201")
        before = count._value.get()
        payload = b'{"user_id": "%s", "amount": 1}' % user.encode()
        for content_type in ("application/json", "application/json; charset=utf-8"):
            r = await ledger.post(
                "/v1/ledger/debits",
                content=payload,
                headers={**penora(), **key(), "content-type": content_type},
            )
            assert r.status_code == 201, r.text
            assert r.headers["x-request-id"]
        assert calls == ["application/json", "application/json; charset=utf-8"]
        assert count._value.get() == before + 2
        assert (await balance(ledger, user))["available"] == 8

    async def test_errors_in_front_are_the_apps_error_bodies(self, ledger, funded_user):
        user = await funded_user(1)
        r = await ledger.post(
            "/v1/ledger/debits", json={"user_id": user, "amount": 2}, headers={**penora(), **key()}
        )
        assert r.status_code == 402, r.text
        assert r.json()["error"]["code"] == "insufficient_credits"
        hold = await ledger.post(
            "/v1/ledger/holds/00000000-0000-0000-0000-000000000000/capture",
            json={},
            headers={**penora(), **key()},
        )
        assert hold.status_code == 404 and hold.json()["error"]["code"] == "hold_not_found"

    async def test_a_body_past_the_front_limit_takes_fastapis_path(self, ledger, funded_user):
        from services.kit.front import FRONT_BODY_LIMIT

        user = await funded_user(5)
        padded = b" " * (FRONT_BODY_LIMIT + 1) + b'{"user_id": "%s", "amount": 2}' % user.encode()
        r = await ledger.post(
            "/v1/ledger/debits",
            content=padded,
            headers={**penora(), **key(), "content-type": "application/json"},
        )
        assert r.status_code == 201, r.text
        assert (await balance(ledger, user))["available"] == 3
