"""Who is calling. The gateway authenticates every request and forwards a signed
principal; services trust that header and nothing else.

Header format: ``X-Ku-Principal: <base64url(json)>.<base64url(ed25519 signature)>``.
The JSON names its issuer (`i`, the process that signed it), its audience (`d`, the
one service that may accept it) and an expiry (`e`, a minute away).

Why per-process Ed25519 keys rather than one shared HMAC secret: with a shared secret
every process that can verify a principal can also mint one, so a single compromised
service could forge an admin or any user for the ledger. Here each process holds only
its own private key (`KU_PRINCIPAL_SIGNING_KEYS`) and everyone holds the public keyring
(`KU_PRINCIPAL_KEYS`). A verifier accepts:

- anything signed by the `gateway` (users, app keys, admins; the gateway authenticated
  them), and
- from any other issuer, only a `service` principal naming that same issuer: the
  generation service can say "I am generation", never "I am user 42" or "I am admin".

and only when `d` is the verifier's own name, so a principal minted for the workspace
is refused by the ledger. See docs/kit.md ("Principals").

A service acting for a caller forwards the caller's gateway-signed principal in
`X-Ku-Origin` (`origin_principal()`); the target checks it was addressed to the
calling service and applies the caller's own limits (a user's own money, a partner's
linked users).
"""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Annotated, Literal

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi import Depends, Request

from services.kit.config import KuSettings, get_settings
from services.kit.errors import Forbidden, Unauthorized

PRINCIPAL_HEADER = "x-ku-principal"
# A service calling another on a caller's behalf forwards the caller's own principal here.
ORIGIN_HEADER = "x-ku-origin"
HEADER_TTL_SECONDS = 60
GATEWAY = "gateway"
# An origin principal may be presented this long after it was signed: a story's
# chapters are held minutes after the request that started them.
ORIGIN_MAX_AGE_SECONDS = 3600

SCOPES = (
    "ledger:read",
    "ledger:write",
    "ledger:grant",
    "workspace:read",
    "workspace:write",
    "generate",
    "enhance",
    "users:write",
    "users:any",
    "admin",
)

Kind = Literal["app", "user", "service"]


@dataclass(frozen=True)
class Principal:
    kind: Kind
    # App keys: the app name (penora, imagegene, ...). Users: the app the token came
    # through. Services: the service's own name.
    app: str | None = None
    user_id: str | None = None
    scopes: frozenset[str] = field(default_factory=frozenset)
    key_prefix: str | None = None

    @property
    def is_admin(self) -> bool:
        """Only an admin key or an admin account: services are not admins (they have lanes)."""
        return "admin" in self.scopes and self.kind in ("app", "user")

    @property
    def actor(self) -> str:
        """Who this is, as recorded on holds and in the audit log."""
        if self.kind == "user":
            return f"user:{self.user_id}"
        if self.kind == "service":
            return f"service:{self.app}"
        return f"app:{self.app}"

    @property
    def who(self) -> str:
        """The actor and, for app keys, which key: what an audit record names."""
        return f"{self.actor} key:{self.key_prefix}" if self.key_prefix else self.actor

    @property
    def idempotency_scope(self) -> str:
        if self.kind == "user":
            return f"user:{self.user_id}"
        return f"{self.kind}:{self.app}"

    def has_scope(self, scope: str) -> bool:
        """Whether the principal holds `scope` (admin holds all). "admin" itself only as
        `is_admin`: a service signs its own principal and could list any scope in it."""
        if scope == "admin":
            return self.is_admin
        return self.is_admin or scope in self.scopes

    def require_scope(self, *scopes: str) -> None:
        """Pass when the principal holds any of `scopes` (admin holds all)."""
        if not any(self.has_scope(s) for s in scopes):
            raise Forbidden(f"Missing scope: {' or '.join(scopes)}", code="missing_scope")

    def acts_for(self, user_id: str) -> None:
        """A user token acts only on its own user id (an admin account on anyone's)."""
        if self.kind == "user" and self.user_id != user_id and not self.is_admin:
            raise Forbidden("A user token may act only on its own user", code="wrong_user")


# --- keys ------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def generate_keypair() -> tuple[str, str]:
    """(private, public) as base64url text, the form the settings take."""
    private = Ed25519PrivateKey.generate()
    raw_public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return _b64(private.private_bytes_raw()), _b64(raw_public)


def parse_keys(text: str) -> dict[str, str]:
    """`name:key,name:key` (the form of both settings) as a dict."""
    out: dict[str, str] = {}
    for item in text.replace(";", ",").split(","):
        name, sep, key = item.strip().partition(":")
        if sep and name.strip() and key.strip():
            out[name.strip()] = key.strip()
    return out


def format_keys(keys: dict[str, str]) -> str:
    return ",".join(f"{name}:{key}" for name, key in sorted(keys.items()))


@dataclass(frozen=True)
class Keys:
    public: dict[str, Ed25519PublicKey]
    private: dict[str, Ed25519PrivateKey]


@lru_cache(maxsize=8)
def _load(keyring: str, signing: str) -> Keys:
    public = {
        n: Ed25519PublicKey.from_public_bytes(_unb64(k)) for n, k in parse_keys(keyring).items()
    }
    private = {
        n: Ed25519PrivateKey.from_private_bytes(_unb64(k)) for n, k in parse_keys(signing).items()
    }
    return Keys(public, private)


def keys(settings: KuSettings | None = None) -> Keys:
    s = settings or get_settings()
    return _load(s.principal_keys, s.principal_signing_keys)


# --- signing and verifying ---------------------------------------------------------------


def sign_principal(
    principal: Principal,
    *,
    audience: str,
    issuer: str,
    settings: KuSettings | None = None,
    now: float | None = None,
) -> str:
    """Sign `principal` as `issuer` (this process must hold that key) for `audience`."""
    private = keys(settings).private.get(issuer)
    if private is None:
        raise RuntimeError(
            f"this process holds no principal signing key for {issuer!r} "
            "(KU_PRINCIPAL_SIGNING_KEYS; `ku up` generates them in development)"
        )
    payload = {
        "i": issuer,
        "d": audience,
        "k": principal.kind,
        "a": principal.app,
        "u": principal.user_id,
        "s": sorted(principal.scopes),
        "p": principal.key_prefix,
        "e": int((now if now is not None else time.time()) + HEADER_TTL_SECONDS),
    }
    body = _b64(orjson.dumps(payload))
    return f"{body}.{_b64(private.sign(body.encode()))}"


def sign_bytes(issuer: str, data: bytes) -> str:
    """Sign arbitrary bytes as `issuer` (events on the bus)."""
    private = keys().private.get(issuer)
    if private is None:
        raise RuntimeError(f"this process holds no principal signing key for {issuer!r}")
    return _b64(private.sign(data))


def derived_secret(name: str, purpose: str) -> str:
    """A secret only process `name` can compute (from its own principal signing key), for
    `purpose`: the console's session key (gateway), signed result links (enhancement)."""
    private = keys().private.get(name)
    if private is None:
        raise RuntimeError(f"this process holds no principal signing key for {name!r}")
    material = purpose.encode() + b"\0" + private.private_bytes_raw()
    return base64.urlsafe_b64encode(hashlib.sha256(material).digest()).decode()


def verify_bytes(issuer: str, data: bytes, signature: str) -> bool:
    public = keys().public.get(issuer)
    if public is None:
        return False
    try:
        public.verify(_unb64(signature), data)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Verified:
    principal: Principal
    issuer: str
    audience: str
    expires_at: int


def _invalid(reason: str) -> Unauthorized:
    return Unauthorized("Invalid internal principal", code="invalid_principal", reason=reason)


def verify_principal(
    header: str,
    *,
    audience: str,
    settings: KuSettings | None = None,
    now: float | None = None,
    max_age: float = 0,
) -> Verified:
    """Check signature, issuer authority, audience and expiry (`max_age` past it allowed)."""
    try:
        body, mac = header.split(".", 1)
        data = orjson.loads(_unb64(body))
        issuer = data["i"]
        public = keys(settings).public.get(issuer) if isinstance(issuer, str) else None
        if public is None:
            raise _invalid("unknown issuer")
        public.verify(_unb64(mac), body.encode())
        kind, app = data["k"], data.get("a")
    except Unauthorized:
        raise
    except (ValueError, KeyError, TypeError, InvalidSignature, orjson.JSONDecodeError):
        raise _invalid("bad signature") from None
    if kind not in ("app", "user", "service"):
        raise _invalid("unknown kind")
    if issuer != GATEWAY and not (kind == "service" and app == issuer):
        # Only the gateway vouches for users, apps and admins; a service only for itself.
        raise _invalid("issuer may not sign this principal")
    if data.get("d") != audience:
        raise _invalid("principal is for another service")
    expires_at = int(data["e"])
    if expires_at + max_age < (now if now is not None else time.time()):
        raise _invalid("expired")
    principal = Principal(
        kind=kind,
        app=app,
        user_id=data.get("u"),
        scopes=frozenset(data.get("s") or ()),
        key_prefix=data.get("p"),
    )
    return Verified(principal, issuer, data["d"], expires_at)


# Verified headers, until they expire: a gateway re-signs a principal about every 20 s
# per caller and service (and a service its own, `ServiceClient.signed`), so most
# requests skip the signature check, for the caller's header and for a forwarded
# origin alike. Keyed by audience and header: a process that serves several services
# (tests) never lets a header verified for one pass at another. The expiry (and an
# origin's allowance past it) is checked on every use.
_verified: dict[tuple[str, str], Verified] = {}
_VERIFIED_MAX = 10_000


def _verify_cached(header: str, *, audience: str, max_age: float = 0) -> Verified:
    now = time.time()
    cached = _verified.get((audience, header))
    if cached is not None and cached.expires_at + max_age >= now:
        return cached
    verified = verify_principal(header, audience=audience, now=now, max_age=max_age)
    if len(_verified) >= _VERIFIED_MAX:
        _verified.clear()
    _verified[(audience, header)] = verified
    return verified


def _audience(request: Request) -> str:
    return str(request.app.state.service_name)


async def get_principal(request: Request) -> Principal:
    """FastAPI dependency: the verified principal of this request, addressed to us."""
    header = request.headers.get(PRINCIPAL_HEADER)
    if not header:
        raise Unauthorized("Missing internal principal", code="missing_principal")
    return _verify_cached(header, audience=_audience(request)).principal


# A route parameter of this type is the caller, verified (every service's routes).
CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


def origin_principal(request: Request, caller: Principal) -> Principal | None:
    """The principal a service forwarded in `X-Ku-Origin`, if any: signed by the gateway,
    addressed to the calling service, recent. None when no origin was sent."""
    header = request.headers.get(ORIGIN_HEADER)
    if not header:
        return None
    if caller.kind != "service":
        raise _invalid("only a service may forward an origin principal")
    verified = _verify_cached(header, audience=str(caller.app), max_age=ORIGIN_MAX_AGE_SECONDS)
    if verified.issuer != GATEWAY or verified.principal.kind == "service":
        raise _invalid("an origin is a caller the gateway authenticated")
    return verified.principal


def outgoing_header(principal: Principal, *, audience: str) -> str:
    """The signed principal header for a call from this process to service `audience`
    (a service signs as itself)."""
    issuer = principal.app if principal.kind == "service" else GATEWAY
    return sign_principal(principal, audience=audience, issuer=str(issuer))


# How long a signed header is reused before it is signed again (well inside its
# HEADER_TTL_SECONDS): an Ed25519 signature per call costs CPU, and a header the target
# has seen before skips its signature check (`get_principal`'s cache).
RESIGN_SECONDS = 20.0


class SignedPrincipal:
    """A principal with its signed header per target service, each re-signed every
    RESIGN_SECONDS (a header names its audience: one signed for the workspace is refused
    by the ledger). The gateway keeps one per authenticated caller; a service's
    `ServiceClient` keeps one for itself."""

    __slots__ = ("principal", "_headers")

    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        self._headers: dict[str, tuple[str, float]] = {}

    def header_for(self, service: str) -> str:
        now = time.monotonic()
        cached = self._headers.get(service)
        if cached is None or now - cached[1] > RESIGN_SECONDS:
            cached = (outgoing_header(self.principal, audience=service), now)
            self._headers[service] = cached
        return cached[0]


def service_principal(name: str) -> Principal:
    """The principal a service or job uses when it calls another service."""
    return Principal(kind="service", app=name)
