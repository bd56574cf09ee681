from __future__ import annotations

import asyncio

from jose import jwk, jwt
from sqlalchemy import text

from services.auth.config import DEFAULT_USER_SCOPES
from tests.auth.helpers import claims, hs_token


async def login(auth, user_id: str) -> dict:
    r = await auth.post("/v1/auth/sso", json={"token": hs_token(claims(user_id))})
    assert r.status_code == 200, r.text
    return r.json()


async def refresh(auth, token: str):
    return await auth.post("/v1/auth/refresh", json={"refresh_token": token})


class TestAccessToken:
    async def test_jwks_verifies_the_issued_token(self, auth, new_user_id):
        user_id = new_user_id()
        pair = await login(auth, user_id)
        r = await auth.get("/.well-known/jwks.json")
        assert r.status_code == 200 and "max-age" in r.headers["cache-control"]
        keys = r.json()["keys"]
        header = jwt.get_unverified_header(pair["access_token"])
        assert header["alg"] in ("RS256", "ES256")
        (key,) = [k for k in keys if k["kid"] == header["kid"]]
        assert "d" not in key and key["use"] == "sig"  # public half only
        decoded = jwt.decode(
            pair["access_token"],
            jwk.construct(key, header["alg"]),
            algorithms=[header["alg"]],
            audience="ku",
            issuer="ku-auth",
        )
        assert decoded["sub"] == user_id
        assert decoded["scope"] == DEFAULT_USER_SCOPES == pair["scope"]
        assert decoded["exp"] - decoded["iat"] == 900
        assert len(decoded["jti"]) >= 16
        other = await login(auth, new_user_id())
        assert jwt.get_unverified_claims(other["access_token"])["jti"] != decoded["jti"]

    async def test_signing_key_is_shared_through_the_database(self, auth, auth_settings):
        from services.auth.app import create_app
        from services.kit.testing.plugin import asgi_client

        first = (await auth.get("/.well-known/jwks.json")).json()
        async with asgi_client(create_app(auth_settings)) as second_process:
            second = (await second_process.get("/.well-known/jwks.json")).json()
        assert first == second and len(first["keys"]) == 1

    async def test_configured_private_key_is_used(self, auth_settings, sso_rsa):
        from services.auth.app import create_app
        from services.kit.testing.plugin import asgi_client

        settings = auth_settings.model_copy(update={"auth_private_key": sso_rsa.private_pem})
        async with asgi_client(create_app(settings)) as client:
            (key,) = (await client.get("/.well-known/jwks.json")).json()["keys"]
        assert key["n"] == sso_rsa.public_jwk["n"]


class TestRefresh:
    async def test_refresh_rotates_the_token(self, auth, new_user_id):
        user_id = new_user_id()
        first = await login(auth, user_id)
        r = await refresh(auth, first["refresh_token"])
        assert r.status_code == 200, r.text
        second = r.json()
        assert second["refresh_token"] != first["refresh_token"]
        assert jwt.get_unverified_claims(second["access_token"])["sub"] == user_id
        r = await refresh(auth, second["refresh_token"])
        assert r.status_code == 200

    async def test_reuse_revokes_the_whole_family(self, auth, new_user_id):
        first = await login(auth, new_user_id())
        second = (await refresh(auth, first["refresh_token"])).json()
        reused = await refresh(auth, first["refresh_token"])
        assert reused.status_code == 401
        assert reused.json()["error"]["code"] == "refresh_token_reused"
        # The legitimate newest token died with the family.
        r = await refresh(auth, second["refresh_token"])
        assert r.status_code == 401 and r.json()["error"]["code"] == "refresh_token_reused"

    async def test_other_sessions_survive_a_reuse(self, auth, new_user_id):
        user_id = new_user_id()
        phone = await login(auth, user_id)
        laptop = await login(auth, user_id)
        await refresh(auth, phone["refresh_token"])
        assert (await refresh(auth, phone["refresh_token"])).status_code == 401
        assert (await refresh(auth, laptop["refresh_token"])).status_code == 200

    async def test_concurrent_use_of_one_token_succeeds_once(self, auth, new_user_id):
        pair = await login(auth, new_user_id())
        results = await asyncio.gather(*(refresh(auth, pair["refresh_token"]) for _ in range(4)))
        assert sorted(r.status_code for r in results) == [200, 401, 401, 401]

    async def test_unknown_and_expired_tokens_are_401(self, auth, new_user_id, sessions):
        r = await refresh(auth, "not-a-token")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_refresh_token"
        pair = await login(auth, new_user_id())
        from services.auth.tokens.service import hash_token

        async with sessions() as s:
            await s.execute(
                text(
                    "UPDATE auth.refresh_tokens SET expires_at = now() - interval '1 second'"
                    " WHERE token_hash = :h"
                ),
                {"h": hash_token(pair["refresh_token"])},
            )
            await s.commit()
        r = await refresh(auth, pair["refresh_token"])
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_refresh_token"

    async def test_only_the_hash_is_stored(self, auth, new_user_id, sessions):
        user_id = new_user_id()
        pair = await login(auth, user_id)
        async with sessions() as s:
            rows = (
                await s.execute(
                    text("SELECT token_hash FROM auth.refresh_tokens WHERE user_id = :u"),
                    {"u": user_id},
                )
            ).all()
        assert len(rows) == 1 and pair["refresh_token"] not in rows[0].token_hash


class TestLogout:
    async def test_logout_ends_the_session(self, auth, new_user_id):
        user_id = new_user_id()
        pair = await login(auth, user_id)
        rotated = (await refresh(auth, pair["refresh_token"])).json()
        other = await login(auth, user_id)
        r = await auth.post("/v1/auth/logout", json={"refresh_token": rotated["refresh_token"]})
        assert r.status_code == 204
        assert (await refresh(auth, rotated["refresh_token"])).status_code == 401
        assert (await refresh(auth, other["refresh_token"])).status_code == 200

    async def test_logout_with_unknown_token_is_harmless(self, auth):
        r = await auth.post("/v1/auth/logout", json={"refresh_token": "nothing-like-it"})
        assert r.status_code == 204
