"""Console sessions and CSRF.

Two ways in, both admins only:
- an admin API key, checked the way the gateway checks any key (`Access.admit`:
  authentication plus the per-address limit, so guessing is throttled);
- an SSO account with the admin role: the main site's SSO token is exchanged at auth
  (`POST /v1/auth/sso`) for a Ku access token and refresh token, and the access token
  must carry the `admin` scope (auth puts it there for users holding the role).

The session record is kept in Redis under a hash of a random id; the browser's cookie
carries only that id. The record holds the credential encrypted (AES-GCM, with a key
derived from the gateway's own principal signing key), because every page
re-authenticates it: a key revoked or expired since sign-in, or an account whose admin
role was taken, ends the session on the next request, and the services see the same
principal the credential would have over the API. An SSO session's access token is
refreshed (rotating the refresh token) when it expires.

CSRF: each session has a random token that every form posts back (compared in constant
time), the cookie is SameSite=Strict, and a POST whose Origin is another site is refused.
Before sign-in, the sign-in forms are protected the same way by a short-lived cookie.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from redis.asyncio import Redis
from starlette.requests import Request
from starlette.responses import Response

from services.kit.errors import Forbidden

COOKIE = "ku_console"
PRE_COOKIE = "ku_console_signin"
COOKIE_PATH = "/console"
SESSION_SECONDS = 8 * 3600


@dataclass
class Credential:
    """What a session signs in with on every page: an admin key, or an SSO account's
    Ku tokens."""

    api_key: str | None = None
    access_token: str | None = None
    refresh_token: str | None = None


@dataclass
class ConsoleSession:
    sid: str
    credential: Credential
    csrf: str
    created_at: float
    flash: list[tuple[str, str]] = field(default_factory=list)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


class Sessions:
    def __init__(self, redis: Redis, prefix: str, secret: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self._aead = AESGCM(hashlib.sha256(b"ku-console-session\0" + secret.encode()).digest())

    def _key(self, sid: str) -> str:
        return f"{self.prefix}.console.session:{hashlib.sha256(sid.encode()).hexdigest()}"

    async def create(self, credential: Credential) -> ConsoleSession:
        session = ConsoleSession(
            sid=secrets.token_urlsafe(32),
            credential=credential,
            csrf=secrets.token_urlsafe(32),
            created_at=time.time(),
        )
        await self.save(session, ttl=SESSION_SECONDS)
        return session

    async def save(self, session: ConsoleSession, ttl: int | None = None) -> None:
        nonce = secrets.token_bytes(12)
        plain = orjson.dumps(asdict(session.credential))
        sealed = self._aead.encrypt(nonce, plain, session.sid.encode())
        record = {
            "key": _b64(nonce + sealed),
            "csrf": session.csrf,
            "created_at": session.created_at,
            "flash": session.flash,
        }
        if ttl is None:
            left = int(session.created_at + SESSION_SECONDS - time.time())
            ttl = max(1, left)
        await self.redis.set(self._key(session.sid), orjson.dumps(record), ex=ttl)

    async def load(self, request: Request) -> ConsoleSession | None:
        sid = request.cookies.get(COOKIE)
        if not sid or len(sid) > 100:
            return None
        raw = await self.redis.get(self._key(sid))
        if raw is None:
            return None
        record: dict[str, Any] = orjson.loads(raw)
        blob = base64.urlsafe_b64decode(record["key"])
        try:
            credential = Credential(
                **orjson.loads(self._aead.decrypt(blob[:12], blob[12:], sid.encode()))
            )
        except Exception:  # another secret since sign-in (or an older record): void
            return None
        return ConsoleSession(
            sid=sid,
            credential=credential,
            csrf=record["csrf"],
            created_at=float(record["created_at"]),
            flash=[(str(kind), str(text)) for kind, text in record.get("flash") or []],
        )

    async def end(self, session: ConsoleSession) -> None:
        await self.redis.delete(self._key(session.sid))


def set_cookie(response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=COOKIE_PATH,
        secure=True,
        httponly=True,
        samesite="strict",
    )


def clear_cookie(response: Response, name: str) -> None:
    response.delete_cookie(name, path=COOKIE_PATH, secure=True, httponly=True, samesite="strict")


def check_origin(request: Request) -> None:
    """A form POST from another site is refused, whatever it carries."""
    origin = request.headers.get("origin")
    if origin is None:  # an old browser: the CSRF token and SameSite still apply
        return
    # Host only, not the scheme: behind a TLS-terminating proxy Ku itself sees http.
    if urlsplit(origin).netloc != request.headers.get("host"):
        raise Forbidden("Cross-site form post refused", code="csrf_origin")


def check_csrf(expected: str | None, sent: Any) -> None:
    if not expected or not isinstance(sent, str) or not hmac.compare_digest(expected, sent):
        raise Forbidden("Invalid or missing CSRF token; reload the page", code="csrf_invalid")
