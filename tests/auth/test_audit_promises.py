"""Promises of README.md and docs/operations.md about the auth process: `/health`,
`/ready` and Prometheus `/metrics` without credentials; access tokens live 15 minutes
(`KU_AUTH_ACCESS_TOKEN_TTL_SECONDS`) and refresh tokens 30 days, as the token answer
says."""

from __future__ import annotations

from tests.auth.helpers import claims, hs_token


async def test_health_ready_and_metrics(auth):
    assert (await auth.get("/health")).json()["status"] == "ok"
    assert (await auth.get("/ready")).status_code == 200
    await auth.get("/.well-known/jwks.json")
    r = await auth.get("/metrics")
    assert r.status_code == 200 and "ku_http_requests_total" in r.text, r.text[:300]
    assert 'service="auth"' in r.text


async def test_token_lifetimes(auth, new_user_id):
    r = await auth.post("/v1/auth/sso", json={"token": hs_token(claims(new_user_id()))})
    assert r.status_code == 200, r.text
    assert r.json()["expires_in"] == 900 and r.json()["refresh_expires_in"] == 30 * 86_400
