"""Negative authentication and shared rate limits, through real gateway processes."""

from __future__ import annotations

import asyncio
import sys
import time

import httpx
import orjson
import pytest

from services.kit.config import KuSettings
from services.kit.principal import Principal, generate_keypair, sign_principal
from services.kit.runner import free_port
from tests.e2e.conftest import E2E
from tests.gateway.helpers import SEED_KEY, new_user_id
from tests.gateway.test_auth import _b64, hs256

pytestmark = pytest.mark.e2e


async def make_user(e2e: E2E, key: str) -> str:
    user_id = new_user_id()
    async with httpx.AsyncClient(base_url=e2e.gateway, timeout=10) as gw:
        r = await gw.post(
            "/api/unified/create-user",
            headers={"X-API-Key": key},
            json={"user_id": user_id, "username": "U", "email": f"{user_id}@example.com"},
        )
        assert r.status_code == 201, r.text
    return user_id


@pytest.fixture(scope="module")
def key(e2e: E2E) -> str:
    return e2e.new_key("imagegene", "ledger:read,ledger:write,users:write")


async def credits(gw: httpx.AsyncClient, key: str, user_id: str) -> float:
    r = await gw.get(
        "/api/unified/user-info", params={"user_id": user_id}, headers={"X-API-Key": key}
    )
    assert r.status_code == 200, r.text
    return r.json()["credits"]


class TestNegativeAuth:
    async def test_bad_credentials_change_nothing(self, e2e: E2E, key: str):
        user_id = await make_user(e2e, key)
        now = int(time.time())
        claims = {
            "sub": user_id,
            "iss": "ku-auth",
            "aud": "ku",
            "iat": now,
            "exp": now + 600,
            "scope": "ledger:read ledger:write",
        }
        alg_none = (
            _b64(b'{"alg":"none","typ":"JWT"}') + b"." + _b64(orjson.dumps(claims)) + b"."
        ).decode()
        confused = hs256(claims, e2e.signing.public_pem.encode(), e2e.signing.kid)
        # Signed with a key no one trusts, as the gateway.
        stranger = KuSettings(principal_signing_keys=f"gateway:{generate_keypair()[0]}")
        forged = sign_principal(
            Principal(kind="app", app="penora", scopes=frozenset({"admin"})),
            audience="ledger",
            issuer="gateway",
            settings=stranger,
        )
        attempts: dict[str, dict[str, str]] = {
            "no key": {},
            "wrong key": {"X-API-Key": "ku_zzzzzzzz_" + "A" * 43},
            "seed key": {"X-API-Key": SEED_KEY},
            "spoofed principal": {"x-ku-principal": forged},
            "alg none": {"Authorization": f"Bearer {alg_none}"},
            "hs256 with rs public key": {"Authorization": f"Bearer {confused}"},
            "expired": {
                "Authorization": "Bearer "
                + e2e.signing.token(user_id, exp=now - 120, iat=now - 900)
            },
            "wrong aud": {"Authorization": "Bearer " + e2e.signing.token(user_id, aud="x")},
            "wrong iss": {"Authorization": "Bearer " + e2e.signing.token(user_id, iss="x")},
        }
        async with httpx.AsyncClient(base_url=e2e.gateway, timeout=10) as gw:
            for name, headers in attempts.items():
                r = await gw.post(
                    "/v1/ledger/debits",
                    headers=headers,
                    json={"user_id": user_id, "amount": 1, "reference": name},
                )
                assert r.status_code in (401, 403), (name, r.status_code, r.text)
                r = await gw.post(
                    "/api/unified/deduct-credits",
                    headers=headers,
                    json={"user_id": user_id, "amount": 1, "project_code": name},
                )
                assert r.status_code in (401, 403), (name, r.text)
                assert r.json()["success"] is False
            assert await credits(gw, key, user_id) == 50

    async def test_user_token_reads_only_its_own_balance(self, e2e: E2E, key: str):
        me, other = await make_user(e2e, key), await make_user(e2e, key)
        auth = {"Authorization": "Bearer " + e2e.signing.token(me)}
        async with httpx.AsyncClient(base_url=e2e.gateway, headers=auth, timeout=10) as gw:
            r = await gw.get("/v1/ledger/balance", params={"user_id": me})
            assert r.status_code == 200 and r.json()["available"] == 50
            r = await gw.get("/v1/ledger/balance", params={"user_id": other})
            assert r.status_code == 403

    async def test_revoked_key_stops_within_5s(self, e2e: E2E, key: str):
        user_id = await make_user(e2e, key)
        doomed = e2e.new_key("penora", "ledger:read")
        prefix = doomed.split("_")[1]
        async with httpx.AsyncClient(base_url=e2e.gateway, timeout=10) as gw:
            params = {"user_id": user_id}
            r = await gw.get("/v1/ledger/balance", params=params, headers={"X-API-Key": doomed})
            assert r.status_code == 200
            await asyncio.to_thread(e2e.ku, "keys", "revoke", prefix)
            start = time.monotonic()
            while time.monotonic() - start < 6:
                r = await gw.get("/v1/ledger/balance", params=params, headers={"X-API-Key": doomed})
                if r.status_code == 401:
                    break
                await asyncio.sleep(0.1)
            assert r.status_code == 401
            assert time.monotonic() - start < 5


class TestSharedRateLimit:
    async def test_two_gateway_processes_share_one_limit(self, e2e: E2E):
        burst = e2e.new_key("burst", "ledger:read")  # KU_GATEWAY_RATE_APPS: 5 per window
        port = free_port()
        second = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "uvicorn",
            "gateway.app:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            env=e2e.suite.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            other = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(timeout=10) as client:
                for _ in range(100):
                    try:
                        if (await client.get(other + "/ready")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.1)
                headers = {"X-API-Key": burst}
                params = {"user_id": new_user_id()}
                codes = []
                for base in (e2e.gateway, other) * 4:
                    r = await client.get(
                        base + "/v1/ledger/balance", params=params, headers=headers
                    )
                    codes.append(r.status_code)
                    if r.status_code == 429:
                        assert int(r.headers["retry-after"]) >= 1
                        assert r.headers["ratelimit-remaining"] == "0"
                assert codes.count(429) == 3, codes  # 8 requests, 5 allowed in total
        finally:
            second.terminate()
            await asyncio.wait_for(second.wait(), 10)
