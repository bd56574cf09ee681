from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import text

from services.auth.config import AuthSettings
from services.auth.tokens.sso import SsoVerifier
from services.kit.errors import Unauthorized
from tests.auth.helpers import (
    SSO_AUDIENCE,
    SSO_ISSUER,
    SSO_KID,
    SSO_SECRET,
    b64,
    claims,
    hs_token,
    raw_token,
    redis_events,
    rs_token,
)


async def user_exists(sessions, user_id: str) -> bool:
    async with sessions() as s:
        n = await s.scalar(text("SELECT count(*) FROM auth.users WHERE id = :u"), {"u": user_id})
    return n == 1


class TestSsoExchange:
    async def test_hs256_login_creates_user_and_returns_tokens(
        self, auth, new_user_id, redis, auth_stream
    ):
        user_id = new_user_id()
        r = await auth.post("/v1/auth/sso", json={"token": hs_token(claims(user_id))})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["token_type"] == "Bearer" and body["expires_in"] == 900
        assert body["user"] == {
            "user_id": user_id,
            "username": "Asha Rao",
            "email": f"{user_id}@example.com",
            "created_at": body["user"]["created_at"],
        }
        assert body["refresh_token"] and body["access_token"].count(".") == 2
        events = await redis_events(redis, auth_stream, "user.created", user_id)
        assert len(events) == 1 and events[0]["username"] == "Asha Rao"

    async def test_rs256_login_via_inline_jwks(self, auth, new_user_id, sso_rsa, sessions):
        user_id = new_user_id()
        r = await auth.post(
            "/v1/auth/sso", json={"token": rs_token(claims(user_id), sso_rsa.private_pem)}
        )
        assert r.status_code == 200, r.text
        assert r.json()["user"]["user_id"] == user_id
        assert await user_exists(sessions, user_id)

    async def test_second_login_keeps_the_user_and_emits_nothing(
        self, auth, new_user_id, redis, auth_stream
    ):
        user_id = new_user_id()
        first = await auth.post("/v1/auth/sso", json={"token": hs_token(claims(user_id))})
        token = hs_token(claims(user_id, email="new@example.com", name="Renamed"))
        second = await auth.post("/v1/auth/sso", json={"token": token})
        assert first.status_code == second.status_code == 200
        assert second.json()["user"] == first.json()["user"]
        await redis_events(redis, auth_stream, "user.created", user_id)
        await asyncio.sleep(0.2)
        assert len(await redis_events(redis, auth_stream, "user.created", user_id)) == 1

    async def test_numeric_sub_keeps_every_digit(self, auth):
        sub = 123456789012345678901
        r = await auth.post("/v1/auth/sso", json={"token": hs_token(claims(sub))})
        assert r.status_code == 200, r.text
        assert r.json()["user"]["user_id"] == "123456789012345678901"

    async def test_expired_within_leeway_is_accepted(self, auth, new_user_id):
        now = int(time.time())
        token = hs_token(claims(new_user_id(), exp=now - 10, iat=now - 400))
        assert (await auth.post("/v1/auth/sso", json={"token": token})).status_code == 200


class TestSsoRejections:
    """Every forged or out-of-policy token is 401 invalid_sso_token and creates nothing."""

    @pytest.fixture
    def cases(self, sso_rsa, attacker_rsa):
        now = int(time.time())

        def build(user_id: str) -> dict[str, tuple[str, str]]:
            c = claims(user_id)
            return {
                "alg none": (
                    raw_token({"alg": "none", "typ": "JWT"}, c, None),
                    "algorithm not allowed",
                ),
                "alg None": (
                    raw_token({"alg": "None", "typ": "JWT"}, c, None),
                    "algorithm not allowed",
                ),
                "hs256 signed with the rs public key": (
                    raw_token(
                        {"alg": "HS256", "typ": "JWT", "kid": SSO_KID},
                        c,
                        sso_rsa.public_pem.encode(),
                    ),
                    "Signature",
                ),
                "hs256 wrong secret": (hs_token(c, secret="not-the-secret"), "Signature"),
                "alg outside allow-list (HS512)": (
                    hs_token(c, alg="HS512"),
                    "algorithm not allowed",
                ),
                "rs256 signed by another key": (rs_token(c, attacker_rsa.private_pem), "Signature"),
                "rs256 unknown kid": (
                    rs_token(c, sso_rsa.private_pem, kid="other"),
                    "no matching key",
                ),
                "expired beyond leeway": (
                    hs_token(claims(user_id, exp=now - 45, iat=now - 400)),
                    "expired",
                ),
                "not yet valid": (hs_token(claims(user_id, nbf=now + 120)), "nbf"),
                "wrong aud": (hs_token(claims(user_id, aud="someone-else")), "audience"),
                "missing aud": (hs_token(claims(user_id, aud=None)), '"aud"'),
                "wrong iss": (hs_token(claims(user_id, iss="https://evil.example")), "issuer"),
                "missing iss": (hs_token(claims(user_id, iss=None)), '"iss"'),
                "missing exp": (hs_token(claims(user_id, exp=None)), '"exp"'),
                "missing sub": (hs_token(claims(user_id, sub=None)), "sub"),
                "empty sub": (hs_token(claims(user_id, sub="")), "sub"),
                "sub with spaces": (hs_token(claims(user_id, sub="a b")), "sub"),
                "tampered payload": (_tamper(hs_token(c)), "Signature"),
                "not a jwt": ("definitely-not-a-jwt", "malformed"),
            }

        return build

    async def test_every_case_is_401_and_creates_no_user(self, auth, cases, new_user_id, sessions):
        user_id = new_user_id()
        for name, (token, reason) in cases(user_id).items():
            r = await auth.post("/v1/auth/sso", json={"token": token})
            assert r.status_code == 401, (name, r.text)
            error = r.json()["error"]
            assert error["code"] == "invalid_sso_token", name
            assert reason in error["detail"]["reason"], (name, error)
            # Our words, never the JWT library's own message (logged instead).
            for jose_text in ("verification failed", "Invalid audience", "Invalid issuer"):
                assert jose_text not in error["detail"]["reason"], (name, error)
        assert not await user_exists(sessions, user_id)
        assert not await user_exists(sessions, "someone-else")

    async def test_missing_token_is_422(self, auth):
        assert (await auth.post("/v1/auth/sso", json={})).status_code == 422


class TestSsoConfiguration:
    def verifier(self, **overrides) -> SsoVerifier:
        base = {
            "sso_algorithms": "HS256,RS256",
            "sso_issuer": SSO_ISSUER,
            "sso_audience": SSO_AUDIENCE,
        }
        return SsoVerifier(AuthSettings(**{**base, **overrides}))

    async def test_without_hs_secret_hs_tokens_are_refused(self, sso_rsa, new_user_id):
        v = self.verifier(sso_jwks=json.dumps({"keys": [sso_rsa.public_jwk]}))
        forged = raw_token({"alg": "HS256"}, claims(new_user_id()), sso_rsa.public_pem.encode())
        with pytest.raises(Unauthorized):
            await v.verify(forged)
        ok = await v.verify(rs_token(claims("42"), sso_rsa.private_pem))
        assert ok.user_id == "42"

    async def test_symmetric_key_in_jwks_never_verifies_anything(self, new_user_id):
        oct_key = {"kty": "oct", "kid": SSO_KID, "k": "c2VjcmV0", "alg": "HS256"}
        v = self.verifier(sso_jwks=json.dumps({"keys": [oct_key]}))
        with pytest.raises(Unauthorized):
            await v.verify(hs_token(claims(new_user_id()), secret="secret"))

    async def test_none_in_the_allow_list_is_ignored(self, new_user_id):
        v = self.verifier(sso_algorithms="none,HS256", sso_hs256_secret=SSO_SECRET)
        assert v.allowed == ["HS256"]
        with pytest.raises(Unauthorized):
            await v.verify(raw_token({"alg": "none"}, claims(new_user_id()), None))

    async def test_jwks_is_fetched_from_the_url(self, sso_rsa, new_user_id):
        jwks = json.dumps({"keys": [sso_rsa.public_jwk]}).encode()
        hits = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                hits.append(self.path)
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(jwks)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
            v = self.verifier(sso_jwks_url=url)
            user_id = new_user_id()
            for _ in range(3):
                ok = await v.verify(rs_token(claims(user_id), sso_rsa.private_pem))
                assert ok.user_id == user_id
            assert hits == ["/jwks.json"]  # cached
        finally:
            server.shutdown()
            server.server_close()

    async def test_unconfigured_sso_is_503(self, new_user_id):
        from services.kit.errors import ServiceUnavailable

        with pytest.raises(ServiceUnavailable):
            await self.verifier().verify(hs_token(claims(new_user_id())))


def _tamper(token: str) -> str:
    header, payload, sig = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data["sub"] = "someone-else"
    return f"{header}.{b64(json.dumps(data).encode())}.{sig}"
