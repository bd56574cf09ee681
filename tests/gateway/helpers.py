"""Helpers shared by the gateway's in-process tests and the end-to-end tests."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from jose import jwt

from services.kit.testing.plugin import principal_headers
from tests.keys import rsa_pem_pair

TOKEN_KID = "gateway-test-kid"
ISSUER = "ku-auth"
AUDIENCE = "ku"
# Printed in plain text in the old system's docs (seeds 000 and 001): never accepted.
SEED_KEY = "Pl2UbWIUMgFNQ-iUtQZSozcSUTd1cyNtsNDMhw87bTRST2fN15qT8DP0MG8ZihhZLDcX14xZlikbuwqlIQZ-og"


@dataclass(frozen=True)
class SigningKey:
    private_pem: str
    public_pem: str
    kid: str = TOKEN_KID

    def token(self, user_id: str, **overrides: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": user_id,
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + 600,
            "jti": uuid.uuid4().hex,
            "scope": "ledger:read ledger:write workspace:read",
        }
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, self.private_pem, algorithm="RS256", headers={"kid": self.kid})


def make_signing_key() -> SigningKey:
    private_pem, public_pem = rsa_pem_pair()
    return SigningKey(private_pem, public_pem)


def admin() -> dict[str, str]:
    return principal_headers("app", audience="auth", app="ops", scopes=("admin",))


def new_user_id() -> str:
    import secrets

    return str(10**20 + secrets.randbelow(9 * 10**20))


FIRST_PARTY = ("penora", "imagegene")


async def create_key(auth: httpx.AsyncClient, app: str, scopes: list[str]) -> tuple[str, str]:
    """(key, prefix) for `app`, made through auth's own admin API. Penora's and ImageGene's
    keys are first-party (`users:any`), as they are issued in production."""
    if app in FIRST_PARTY and "users:any" not in scopes and "admin" not in scopes:
        scopes = [*scopes, "users:any"]
    await auth.post("/v1/apps", json={"name": app}, headers=admin())
    r = await auth.post("/v1/keys", json={"app": app, "scopes": scopes}, headers=admin())
    assert r.status_code == 201, r.text
    body = r.json()
    return body["key"], body["prefix"]


async def revoke_key(auth: httpx.AsyncClient, prefix: str) -> None:
    r = await auth.post(f"/v1/keys/{prefix}/revoke", headers=admin())
    assert r.status_code == 200, r.text


HUGE = 64 * 1024 * 1024
CHUNK = 64 * 1024


@dataclass
class AsgiAnswer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    pulled: int  # request body bytes the app read


async def asgi_post(app: Any, path: str, headers: Sequence[tuple[bytes, bytes]]) -> AsgiAnswer:
    """POST a 64 MB body to `app` at the ASGI level (no server to bound it first)."""
    pulled = 0
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if pulled >= HUGE:
            return {"type": "http.disconnect"}
        pulled += CHUNK
        return {"type": "http.request", "body": b"x" * CHUNK, "more_body": pulled < HUGE}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": list(headers),
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=30)
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return AsgiAnswer(start["status"], dict(start["headers"]), body, pulled)
