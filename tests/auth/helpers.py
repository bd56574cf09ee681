"""Request and token helpers for auth tests. Principal headers are signed per call."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from typing import Any

import orjson
from jose import jwt
from redis.asyncio import Redis

from services.kit.testing.plugin import principal_headers

SSO_SECRET = "test-sso-shared-secret-0123456789abcdef"
SSO_ISSUER = "https://main.example"
SSO_AUDIENCE = "ku-sso"
SSO_KID = "main-1"


def admin() -> dict[str, str]:
    return principal_headers("app", app="ops", scopes=("admin",))


def gateway() -> dict[str, str]:
    """What the gateway sends: `service_principal("gateway")`."""
    return principal_headers("service", app="gateway", scopes=())


def app_with(*scopes: str, app: str = "penora") -> dict[str, str]:
    return principal_headers("app", app=app, scopes=scopes)


def user(user_id: str) -> dict[str, str]:
    return principal_headers("user", app="penora", user_id=user_id, scopes=("ledger:read",))


def claims(user_id: str, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": user_id,
        "email": f"{user_id}@example.com",
        "name": "Asha Rao",
        "iss": SSO_ISSUER,
        "aud": SSO_AUDIENCE,
        "iat": now,
        "exp": now + 300,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def hs_token(payload: dict[str, Any], secret: str = SSO_SECRET, alg: str = "HS256") -> str:
    return jwt.encode(payload, secret, algorithm=alg)


def rs_token(payload: dict[str, Any], private_pem: str, kid: str | None = SSO_KID) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(payload, private_pem, algorithm="RS256", headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], payload: dict[str, Any], mac_key: bytes | None) -> str:
    """A hand-made JWT: unsigned when `mac_key` is None, else HMAC-SHA256 with that key
    (python-jose refuses to build the forgeries we need to test)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if mac_key is None:
        return signing_input + "."
    mac = hmac.new(mac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


async def stream_event(
    redis: Redis, stream: str, topic: str, match: dict[str, Any], wait: float = 5.0
) -> dict[str, Any]:
    """Wait for an event on `stream` whose payload contains `match`."""
    deadline = time.monotonic() + wait
    while True:
        for _, fields in await redis.xrange(stream):
            data = {k.decode(): v.decode() for k, v in fields.items()}
            payload = orjson.loads(data["payload"])
            if data["topic"] == topic and all(payload.get(k) == v for k, v in match.items()):
                return {"id": data["id"], "topic": data["topic"], "payload": payload}
        if time.monotonic() > deadline:
            raise AssertionError(f"no {topic} {match} on {stream} within {wait}s")
        await asyncio.sleep(0.05)


async def redis_events(
    redis: Redis, stream: str, topic: str, user_id: str, wait: float = 5.0
) -> list[dict[str, Any]]:
    """Every `topic` payload for `user_id` on `stream`, once at least one has arrived."""
    await stream_event(redis, stream, topic, {"user_id": user_id}, wait=wait)
    payloads = []
    for _, fields in await redis.xrange(stream):
        payload = orjson.loads(fields[b"payload"])
        if fields[b"topic"].decode() == topic and payload.get("user_id") == user_id:
            payloads.append(payload)
    return payloads
