"""Who gets through the gateway: keys, access tokens, and what each may touch."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time

import httpx
import orjson
from jose import jwt

from services.kit.testing.plugin import principal_headers
from tests.gateway.conftest import Stack
from tests.gateway.helpers import SEED_KEY, admin, create_key, new_user_id, revoke_key

INVALID_KEY = "Invalid or missing API key. Include X-API-Key header or api_key parameter."


async def funded_user(stack: Stack) -> str:
    user_id = new_user_id()
    r = await stack.ledger.post(
        "/v1/ledger/accounts",
        json={"user_id": user_id, "welcome": True},
        headers=principal_headers("app", audience="ledger", app="ops", scopes=("admin",)),
    )
    assert r.status_code == 201, r.text
    return user_id


async def available(stack: Stack, user_id: str) -> float:
    r = await stack.ledger.get(
        "/v1/ledger/balance",
        params={"user_id": user_id},
        headers=principal_headers("app", audience="ledger", app="ops", scopes=("admin",)),
    )
    return r.json()["available"]


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def hs256(claims: dict[str, object], secret: bytes, kid: str) -> str:
    """An HS256 token by hand (jose rightly refuses to use a public key as a secret)."""
    signing_input = (
        _b64(orjson.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}))
        + b"."
        + _b64(orjson.dumps(claims))
    )
    mac = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + _b64(mac)).decode()


def debit(user_id: str) -> dict[str, object]:
    return {"user_id": user_id, "amount": 1, "reference": new_user_id()}


class TestApiKeys:
    async def test_no_key_is_401_in_both_shapes(self, gw: httpx.AsyncClient, stack: Stack):
        user_id = await funded_user(stack)
        r = await gw.get("/v1/ledger/balance", params={"user_id": user_id})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        r = await gw.get("/api/unified/user-info", params={"user_id": user_id})
        assert r.status_code == 401
        assert r.json() == {"success": False, "error": INVALID_KEY, "code": "invalid_api_key"}

    async def test_wrong_and_seed_keys_change_nothing(self, gw: httpx.AsyncClient, stack: Stack):
        user_id = await funded_user(stack)
        for key in (SEED_KEY, "ku_abcdefgh_" + "x" * 43, "nonsense"):
            r = await gw.post("/v1/ledger/debits", json=debit(user_id), headers={"X-API-Key": key})
            assert r.status_code == 401, (key, r.text)
            r = await gw.post(
                "/api/unified/deduct-credits",
                params={"api_key": key},
                json={"user_id": user_id, "amount": 1, "project_code": "p1"},
            )
            assert r.status_code == 401
            assert r.json()["error"] == INVALID_KEY
        assert await available(stack, user_id) == 50

    async def test_query_key_only_on_the_old_clients_routes(
        self, gw: httpx.AsyncClient, stack: Stack, app_key: str
    ):
        user_id = await funded_user(stack)
        # The seeds' clients send ?api_key= to /api/unified/* (seed 001): it works there...
        r = await gw.get("/api/unified/user-info", params={"user_id": user_id, "api_key": app_key})
        assert r.status_code == 200, r.text
        assert r.json()["credits"] == 50
        # ...and nowhere else: a key in a URL ends up in logs.
        r = await gw.get("/v1/ledger/balance", params={"user_id": user_id, "api_key": app_key})
        assert r.status_code == 401, r.text
        r = await gw.get(
            "/v1/ledger/balance", params={"user_id": user_id}, headers={"X-API-Key": app_key}
        )
        assert r.status_code == 200 and r.json()["available"] == 50

    async def test_revoked_key_stops_within_5s(self, gw: httpx.AsyncClient, stack: Stack):
        key, prefix = await create_key(stack.auth, "penora", ["ledger:read"])
        user_id = await funded_user(stack)
        headers = {"X-API-Key": key}
        r = await gw.get("/v1/ledger/balance", params={"user_id": user_id}, headers=headers)
        assert r.status_code == 200  # now cached in the gateway
        await revoke_key(stack.auth, prefix)
        start = time.monotonic()
        while time.monotonic() - start < 5:
            r = await gw.get("/v1/ledger/balance", params={"user_id": user_id}, headers=headers)
            if r.status_code == 401:
                break
            await asyncio.sleep(0.05)
        assert r.status_code == 401
        # The key.revoked event, not the cache TTL, should have done it.
        assert time.monotonic() - start < 2

    async def test_spoofed_principal_header_is_ignored(self, gw: httpx.AsyncClient, stack: Stack):
        user_id = await funded_user(stack)
        forged = principal_headers("app", audience="ledger", app="penora", scopes=("admin",))
        r = await gw.post("/v1/ledger/debits", json=debit(user_id), headers=forged)
        assert r.status_code == 401
        bad = {"x-ku-principal": "e30.AAAA"}
        r = await gw.post("/v1/ledger/debits", json=debit(user_id), headers=bad)
        assert r.status_code == 401
        assert await available(stack, user_id) == 50

    async def test_missing_scope_is_403(self, gw: httpx.AsyncClient, stack: Stack):
        key, _ = await create_key(stack.auth, "reader", ["workspace:read"])
        user_id = await funded_user(stack)
        r = await gw.post("/v1/ledger/debits", json=debit(user_id), headers={"X-API-Key": key})
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "missing_scope"
        r = await gw.post(
            "/api/unified/deduct-credits",
            headers={"X-API-Key": key},
            json={"user_id": user_id, "amount": 1, "project_code": "x"},
        )
        assert r.status_code == 403 and r.json()["success"] is False
        assert await available(stack, user_id) == 50


class TestAccessTokens:
    async def test_own_balance_ok_but_never_a_direct_debit(
        self, gw: httpx.AsyncClient, stack: Stack
    ):
        user_id = await funded_user(stack)
        auth = {"Authorization": f"Bearer {stack.signing.token(user_id)}"}
        r = await gw.get("/v1/ledger/balance", params={"user_id": user_id}, headers=auth)
        assert r.status_code == 200, r.text
        # Users spend through generation and enhancement, never by debiting themselves.
        r = await gw.post("/v1/ledger/debits", json=debit(user_id), headers=auth)
        assert r.status_code == 403, r.text
        assert await available(stack, user_id) == 50

    async def test_the_admin_scope_holds_only_while_the_role_does(
        self, gw: httpx.AsyncClient, stack: Stack
    ):
        """A token's `admin` scope counts only while auth says its user holds the admin
        role: never for a user who does not, and within seconds of the role being taken,
        not when the token expires (10 minutes here)."""
        SCOPE = "admin ledger:read"
        operator, other = new_user_id(), await funded_user(stack)
        r = await stack.auth.post(
            "/v1/users", json={"user_id": operator, "email": "op@example.com"}, headers=admin()
        )
        assert r.status_code == 201, r.text
        auth = {"Authorization": f"Bearer {stack.signing.token(operator, scope=SCOPE)}"}

        async def reads_another_user() -> int:
            r = await gw.get("/v1/ledger/balance", params={"user_id": other}, headers=auth)
            return r.status_code

        assert await reads_another_user() == 403  # the claim alone is not the role
        role = f"/v1/users/{operator}/roles/admin"
        r = await stack.auth.put(role, json={"reason": "on call"}, headers=admin())
        assert r.status_code == 200, r.text
        auth = {"Authorization": f"Bearer {stack.signing.token(operator, scope=SCOPE)}"}
        assert await reads_another_user() == 200
        r = await stack.auth.post(f"{role}/revoke", json={"reason": "off call"}, headers=admin())
        assert r.status_code == 200, r.text
        for _ in range(150):  # the role is asked again at most every 5 s per token
            if await reads_another_user() == 403:
                break
            await asyncio.sleep(0.1)
        r = await gw.get("/v1/ledger/balance", params={"user_id": other}, headers=auth)
        assert r.status_code == 403 and r.json()["error"]["code"] == "wrong_user", r.text

    async def test_another_users_data_is_403(self, gw: httpx.AsyncClient, stack: Stack):
        me, other = await funded_user(stack), await funded_user(stack)
        auth = {"Authorization": f"Bearer {stack.signing.token(me)}"}
        r = await gw.get("/v1/ledger/balance", params={"user_id": other}, headers=auth)
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "wrong_user"
        r = await gw.post("/v1/ledger/debits", json=debit(other), headers=auth)
        assert r.status_code == 403
        r = await gw.get(f"/v1/users/{other}", headers=auth)
        assert r.status_code == 403
        r = await gw.get("/api/unified/user-info", params={"user_id": other}, headers=auth)
        assert r.status_code == 403 and r.json()["success"] is False
        assert await available(stack, other) == 50

    async def test_forged_tokens_are_401(self, gw: httpx.AsyncClient, stack: Stack):
        user_id = await funded_user(stack)
        now = int(time.time())
        claims = {
            "sub": user_id,
            "iss": "ku-auth",
            "aud": "ku",
            "iat": now,
            "exp": now + 600,
            "scope": "ledger:read ledger:write",
        }
        head, body = _b64(orjson.dumps({"alg": "none", "typ": "JWT"})), _b64(orjson.dumps(claims))
        alg_none = (head + b"." + body + b".").decode()
        # HS256 "signed" with the RSA public key (the classic key-confusion attack).
        confused = hs256(claims, stack.signing.public_pem.encode(), stack.signing.kid)
        tokens = {
            "alg none": alg_none,
            "hs256 with public key": confused,
            "expired": stack.signing.token(user_id, exp=now - 120, iat=now - 900),
            "wrong aud": stack.signing.token(user_id, aud="someone-else"),
            "wrong iss": stack.signing.token(user_id, iss="https://evil.example"),
            "unknown kid": jwt.encode(
                claims, stack.signing.private_pem, algorithm="RS256", headers={"kid": "nope"}
            ),
            "garbage": "not.a.token",
        }
        for name, token in tokens.items():
            auth = {"Authorization": f"Bearer {token}"}
            r = await gw.post("/v1/ledger/debits", json=debit(user_id), headers=auth)
            assert r.status_code == 401, (name, r.text)
            r = await gw.get("/v1/ledger/balance", params={"user_id": user_id}, headers=auth)
            assert r.status_code == 401, name
        assert await available(stack, user_id) == 50


class TestPublicRoutes:
    async def test_razorpay_webhook_needs_no_key(self, gw: httpx.AsyncClient):
        r = await gw.post("/v1/billing/webhooks/razorpay", content=b"{}")
        assert r.status_code != 401

    async def test_jwks_is_public(self, gw: httpx.AsyncClient, stack: Stack):
        r = await gw.get("/.well-known/jwks.json")
        assert r.status_code == 200
        assert any(k["kid"] == stack.signing.kid for k in r.json()["keys"])
