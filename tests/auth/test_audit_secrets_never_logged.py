"""An API key (and a refresh token) is shown once, to its holder: it never reaches a
log record, an event on the bus or any table but as its sha256. Checked over a key's
whole life (create, verify, a wrong secret, rotate, revoke) and a session's (SSO
exchange, refresh, reuse, logout), at DEBUG, with every logger propagating."""

from __future__ import annotations

import hashlib
import logging
import secrets

from sqlalchemy import text

from tests.auth.helpers import admin, claims, gateway, hs_token


async def _everything_stored(sessions) -> str:
    async with sessions() as s:
        rows = []
        for table in ("auth.outbox", "auth.api_keys", "auth.refresh_tokens", "auth.apps"):
            rows += [str(tuple(r)) for r in await s.execute(text(f"SELECT * FROM {table}"))]
    return "\n".join(rows)


async def test_keys_and_refresh_tokens_reach_no_log_event_or_table(
    auth, sessions, redis, auth_stream, caplog, new_user_id
):
    caplog.set_level(logging.DEBUG)
    app = f"logs-{secrets.token_hex(3)}"
    assert (await auth.post("/v1/apps", json={"name": app}, headers=admin())).status_code == 201
    r = await auth.post("/v1/keys", json={"app": app, "scopes": ["ledger:read"]}, headers=admin())
    assert r.status_code == 201, r.text
    first = r.json()["key"]
    for key in (first, first[:-1] + ("A" if first[-1] != "A" else "B")):
        await auth.post("/internal/keys/verify", json={"key": key}, headers=gateway())
    r = await auth.post(
        f"/v1/keys/{r.json()['prefix']}/rotate", json={"overlap_seconds": 0}, headers=admin()
    )
    assert r.status_code == 201, r.text
    second = r.json()["key"]
    r = await auth.post(f"/v1/keys/{r.json()['prefix']}/revoke", headers=admin())
    assert r.status_code == 200, r.text

    r = await auth.post("/v1/auth/sso", json={"token": hs_token(claims(new_user_id()))})
    assert r.status_code == 200, r.text
    refresh = r.json()["refresh_token"]
    r = await auth.post("/v1/auth/refresh", json={"refresh_token": refresh})
    assert r.status_code == 200, r.text
    newer = r.json()["refresh_token"]
    await auth.post("/v1/auth/refresh", json={"refresh_token": refresh})  # reuse
    await auth.post("/v1/auth/logout", json={"refresh_token": newer})

    secrets_shown = {"first key": first, "rotated key": second, "refresh": refresh}
    secrets_shown["newer refresh"] = newer
    logged = "\n".join(
        f"{r.getMessage()} {r.args!r} {getattr(r, '__dict__', {})!r}" for r in caplog.records
    )
    assert len(caplog.records) > 5, "no log records captured: the check would be empty"
    stored = await _everything_stored(sessions)
    stream = repr(await redis.xrange(auth_stream))
    for what, secret in secrets_shown.items():
        assert secret not in logged, f"{what} in a log record"
        assert secret not in stored, f"{what} stored in clear"
        assert secret not in stream, f"{what} on the bus"
    for key in (first, second):
        assert hashlib.sha256(key.encode()).hexdigest() in stored  # what is kept instead
