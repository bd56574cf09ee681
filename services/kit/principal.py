"""Who is calling. The gateway authenticates every request and forwards a signed
principal header; services trust that header and nothing else.

Header format: ``X-Ku-Principal: <base64url(json)>.<base64url(hmac-sha256)>`` keyed
with ``KU_INTERNAL_SECRET``. The JSON carries an expiry so a captured header is
useless after a minute.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass, field
from typing import Literal

import orjson
from fastapi import Request

from services.kit.config import get_settings
from services.kit.errors import Forbidden, Unauthorized

PRINCIPAL_HEADER = "x-ku-principal"
# A service calling another on a caller's behalf forwards the caller's own principal here.
ORIGIN_HEADER = "x-ku-origin"
HEADER_TTL_SECONDS = 60

SCOPES = (
    "ledger:read",
    "ledger:write",
    "ledger:grant",
    "workspace:read",
    "workspace:write",
    "generate",
    "enhance",
    "users:write",
    "admin",
)


@dataclass(frozen=True)
class Principal:
    kind: Literal["app", "user", "service"]
    # App keys: the app name (penora, imagegene, ...). Users: the app the token came through.
    app: str | None = None
    user_id: str | None = None
    scopes: frozenset[str] = field(default_factory=frozenset)
    key_prefix: str | None = None

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes or self.kind == "service"

    @property
    def idempotency_scope(self) -> str:
        if self.kind == "user":
            return f"user:{self.user_id}"
        return f"{self.kind}:{self.app}"

    def has_scope(self, scope: str) -> bool:
        return self.is_admin or scope in self.scopes

    def require_scope(self, *scopes: str) -> None:
        """Pass when the principal holds any of `scopes` (admin holds all)."""
        if not any(self.has_scope(s) for s in scopes):
            raise Forbidden(f"Missing scope: {' or '.join(scopes)}", code="missing_scope")

    def acts_for(self, user_id: str) -> None:
        """A user token acts only on its own user id; apps act for any user they name."""
        if self.kind == "user" and self.user_id != user_id:
            raise Forbidden("A user token may act only on its own user", code="wrong_user")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_principal(principal: Principal, secret: str, *, now: float | None = None) -> str:
    payload = {
        "k": principal.kind,
        "a": principal.app,
        "u": principal.user_id,
        "s": sorted(principal.scopes),
        "p": principal.key_prefix,
        "e": int((now or time.time()) + HEADER_TTL_SECONDS),
    }
    body = _b64(orjson.dumps(payload))
    mac = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


def verify_principal(header: str, secret: str, *, now: float | None = None) -> Principal:
    try:
        body, mac = header.split(".", 1)
        expected = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(mac)):
            raise ValueError("bad signature")
        data = orjson.loads(_unb64(body))
        if int(data["e"]) < (now or time.time()):
            raise ValueError("expired")
        return Principal(
            kind=data["k"],
            app=data.get("a"),
            user_id=data.get("u"),
            scopes=frozenset(data.get("s") or ()),
            key_prefix=data.get("p"),
        )
    except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
        raise Unauthorized("Invalid internal principal", code="invalid_principal") from None


# Verified headers, until they expire: a gateway re-signs a principal about once a
# second per caller, so most requests skip the HMAC and the JSON decode.
_verified: dict[str, tuple[Principal, int]] = {}
_VERIFIED_MAX = 10_000


async def get_principal(request: Request) -> Principal:
    """FastAPI dependency: the verified principal of this request."""
    header = request.headers.get(PRINCIPAL_HEADER)
    if not header:
        raise Unauthorized("Missing internal principal", code="missing_principal")
    now = time.time()
    cached = _verified.get(header)
    if cached is not None and cached[1] >= now:
        return cached[0]
    principal = verify_principal(header, get_settings().require_internal_secret(), now=now)
    if len(_verified) >= _VERIFIED_MAX:
        _verified.clear()
    _verified[header] = (principal, _expiry(header))
    return principal


def _expiry(header: str) -> int:
    return int(orjson.loads(_unb64(header.split(".", 1)[0]))["e"])


def outgoing_header(principal: Principal, *, audience: str) -> str:
    """The signed principal header for a call from this process to service `audience`."""
    return sign_principal(principal, get_settings().require_internal_secret())


def service_principal(name: str) -> Principal:
    """The principal a service or job uses when it calls another service."""
    return Principal(kind="service", app=name, scopes=frozenset({"admin"}))
