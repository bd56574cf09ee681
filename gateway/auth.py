"""Who is calling: API keys (checked at auth, cached ≤ 5 s, dropped on `key.revoked`)
and Ku access tokens (verified here from auth's JWKS). A token's `admin` scope holds
only while its user still holds the admin role: asked of auth at most every 5 s per
token, so taking the role ends the scope within seconds, not when the token expires.

The result is a `SignedPrincipal`: the principal and the signed header the
gateway forwards. Nothing a client sends is forwarded as identity.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections import OrderedDict
from datetime import datetime
from typing import Any

from jose import jwt
from jose.exceptions import JOSEError

from gateway.config import GatewaySettings
from gateway.upstream import Upstreams
from services.kit.errors import KuError, Unauthorized, UpstreamError
from services.kit.principal import Principal, SignedPrincipal, service_principal

log = logging.getLogger("ku.gateway.auth")

KEY_FORMAT = re.compile(r"^ku_([A-Za-z0-9]{8})_[A-Za-z0-9_-]{16,200}$")
# Access tokens are asymmetric only: HS* (including HS256 "signed" with a public key)
# and `none` never pass, whatever the token header says.
TOKEN_ALGORITHMS = {"RS256": "RSA", "ES256": "EC"}
CACHE_MAX = 20_000
INVALID_KEY = "Invalid or missing API key. Include X-API-Key header or api_key parameter."


def _invalid_key() -> Unauthorized:
    return Unauthorized(INVALID_KEY, code="invalid_api_key")


def _invalid_token(reason: str) -> Unauthorized:
    return Unauthorized("Invalid access token", code="invalid_token", reason=reason)


class _Entry:
    __slots__ = ("identity", "prefix", "valid_until")

    def __init__(self, identity: SignedPrincipal | None, prefix: str, valid_until: float) -> None:
        self.identity = identity  # None: a key auth rejected (negative cache)
        self.prefix = prefix
        self.valid_until = valid_until


class Authenticator:
    def __init__(self, settings: GatewaySettings, upstreams: Upstreams) -> None:
        self.settings = settings
        self.upstreams = upstreams
        self._service = SignedPrincipal(service_principal("gateway"))
        self._keys: OrderedDict[bytes, _Entry] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[_Entry]] = {}
        self._tokens: OrderedDict[str, tuple[SignedPrincipal, float]] = OrderedDict()
        self._jwks: dict[str, dict[str, Any]] = {}
        self._jwks_at = 0.0
        self._jwks_lock = asyncio.Lock()

    # --- API keys -------------------------------------------------------------------

    async def api_key(self, key: str) -> SignedPrincipal:
        digest = hashlib.sha256(key.encode()).digest()
        entry = self._keys.get(digest)
        if entry is None or entry.valid_until < time.monotonic():
            # Only a key of the right format was ever cached (and is sent to auth).
            match = KEY_FORMAT.match(key)
            if match is None:  # includes the key printed in the old docs: never sent to auth
                raise _invalid_key()
            entry = await self._verify_once(digest, key, match.group(1))
        if entry.identity is None:
            raise _invalid_key()
        return entry.identity

    def _cached_key(self, key: str) -> SignedPrincipal | None:
        entry = self._keys.get(hashlib.sha256(key.encode()).digest())
        if entry is None or entry.identity is None or entry.valid_until < time.monotonic():
            return None
        return entry.identity

    async def _verify_once(self, digest: bytes, key: str, prefix: str) -> _Entry:
        """One auth call per key at a time, however many requests wait for it."""
        future = self._inflight.get(digest)
        if future is not None:
            return await asyncio.shield(future)
        future = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        try:
            entry = await self._verify(key, prefix)
            self._remember(digest, entry)
            future.set_result(entry)
            return entry
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        finally:
            del self._inflight[digest]

    async def _verify(self, key: str, prefix: str) -> _Entry:
        status, body = await self.upstreams.call(
            "auth",
            "POST",
            "/internal/keys/verify",
            principal=self._service,
            json={"key": key},
            timeout_seconds=5,
        )
        ttl = self.settings.key_cache_seconds
        now = time.monotonic()
        if status in (401, 403, 404):
            return _Entry(None, prefix, now + ttl)
        if status != 200 or not isinstance(body, dict):
            raise UpstreamError("The auth service could not verify the key", service="auth")
        expires_at = body.get("expires_at")
        if expires_at:
            left = datetime.fromisoformat(str(expires_at)).timestamp() - time.time()
            if left <= 0:
                return _Entry(None, prefix, now + ttl)
            ttl = min(ttl, left)
        principal = Principal(
            kind="app",
            app=body.get("app"),
            scopes=frozenset(body.get("scopes") or ()),
            key_prefix=body.get("prefix") or prefix,
        )
        return _Entry(SignedPrincipal(principal), prefix, now + ttl)

    def _remember(self, digest: bytes, entry: _Entry) -> None:
        self._keys[digest] = entry
        self._keys.move_to_end(digest)
        while len(self._keys) > CACHE_MAX:
            self._keys.popitem(last=False)

    def revoke_prefix(self, prefix: str) -> int:
        """Forget every cached key with this prefix (a `key.revoked` event)."""
        gone = [d for d, e in self._keys.items() if e.prefix == prefix]
        for digest in gone:
            del self._keys[digest]
        return len(gone)

    # --- access tokens --------------------------------------------------------------

    async def access_token(self, token: str) -> SignedPrincipal:
        cached = self._cached_token(token)
        if cached is not None:
            return cached
        try:
            header = jwt.get_unverified_header(token)
        except JOSEError:
            raise _invalid_token("malformed") from None
        alg, kid = header.get("alg"), header.get("kid")
        # (A header's values are any JSON: a list or an object is no name to look up.)
        if not isinstance(alg, str) or alg not in TOKEN_ALGORITHMS:
            raise _invalid_token("algorithm not allowed")
        if not isinstance(kid, str):
            raise _invalid_token("unknown key")
        key = await self._jwk(kid)
        if key is None or key.get("kty") != TOKEN_ALGORITHMS[alg]:
            raise _invalid_token("unknown key")
        if key.get("alg") and key["alg"] != alg:
            raise _invalid_token("algorithm does not match key")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.settings.auth_token_audience,
                issuer=self.settings.auth_token_issuer,
                options={
                    "require_exp": True,
                    "require_aud": True,
                    "require_iss": True,
                    "require_sub": True,
                    "leeway": self.settings.auth_token_leeway_seconds,
                },
            )
        except JOSEError as exc:
            raise _invalid_token(type(exc).__name__) from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise _invalid_token("no subject")
        scope = claims.get("scope") or ""
        principal = Principal(
            kind="user",
            user_id=sub,
            app=claims.get("app") if isinstance(claims.get("app"), str) else None,
            scopes=frozenset(scope.split() if isinstance(scope, str) else ()),
        )
        valid = min(float(claims["exp"]), time.time() + 60)
        if "admin" in principal.scopes:
            valid = min(valid, time.time() + self.settings.key_cache_seconds)
            if not await self._holds_admin_role(principal):
                principal = Principal(
                    kind="user",
                    user_id=sub,
                    app=principal.app,
                    scopes=principal.scopes - {"admin"},
                )
        identity = SignedPrincipal(principal)
        self._tokens[token] = (identity, valid)
        while len(self._tokens) > CACHE_MAX:
            self._tokens.popitem(last=False)
        return identity

    def _cached_token(self, token: str) -> SignedPrincipal | None:
        cached = self._tokens.get(token)
        return cached[0] if cached is not None and cached[1] > time.time() else None

    async def _holds_admin_role(self, principal: Principal) -> bool:
        """Whether the token's user holds the admin role now (auth's answer to the user
        reading its own roles). Any other answer, or none, is no: the request goes on
        without the admin scope."""
        try:
            status, body = await self.upstreams.call(
                "auth",
                "GET",
                f"/v1/users/{principal.user_id}/roles",
                principal=principal,
                timeout_seconds=5,
            )
        except KuError:
            status, body = 0, None
        if status == 200 and isinstance(body, dict):
            return "admin" in (body.get("roles") or ())
        if status not in (401, 403, 404):
            log.warning("could not check user %s's admin role (%s)", principal.user_id, status)
        return False

    async def _jwk(self, kid: str) -> dict[str, Any] | None:
        now = time.monotonic()
        stale = now - self._jwks_at > self.settings.gateway_jwks_cache_seconds
        # An unknown kid refetches (key rotation), at most every 5 s.
        if stale or (kid not in self._jwks and now - self._jwks_at > 5):
            async with self._jwks_lock:
                if self._jwks_at <= now:
                    await self._fetch_jwks()
        return self._jwks.get(kid)

    async def _fetch_jwks(self) -> None:
        try:
            status, body = await self.upstreams.call(
                "auth", "GET", "/.well-known/jwks.json", principal=None, timeout_seconds=5
            )
        except KuError as exc:
            log.warning("JWKS fetch failed: %s", exc.message)
            self._jwks_at = time.monotonic() - self.settings.gateway_jwks_cache_seconds + 5
            return
        keys = body.get("keys") if status == 200 and isinstance(body, dict) else None
        if isinstance(keys, list):
            self._jwks = {k["kid"]: k for k in keys if isinstance(k, dict) and "kid" in k}
        self._jwks_at = time.monotonic()

    # --- either ---------------------------------------------------------------------

    async def authenticate(self, api_key: str | None, authorization: str | None) -> SignedPrincipal:
        if api_key:
            return await self.api_key(api_key)
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                # OpenAI-style clients send their API key as a bearer token: a Ku key
                # (its own `ku_` format, never a JWT) is checked as the key it is.
                if KEY_FORMAT.match(token.strip()):
                    return await self.api_key(token.strip())
                return await self.access_token(token.strip())
            raise _invalid_token("not a bearer token")
        raise _invalid_key()

    def cached(self, api_key: str | None, authorization: str | None) -> SignedPrincipal | None:
        """`authenticate`'s answer when it is cached and valid (a key auth accepted, a
        token verified, within their TTLs), without awaiting anything; None when
        `authenticate` must run (a miss, an expired entry, a refusal to raise)."""
        if api_key:
            return self._cached_key(api_key)
        if authorization:
            scheme, _, token = authorization.partition(" ")
            token = token.strip()
            if scheme.lower() == "bearer" and token:
                # A key's digest is cached only once auth accepted it (so its format),
                # a token only once verified: the lookup stands for the full check.
                if token.startswith("ku_"):  # a key's prefix; never a JWT's ("eyJ...")
                    return self._cached_key(token)
                return self._cached_token(token)
        return None
