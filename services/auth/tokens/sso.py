"""Verifying the main site's SSO JWT.

Strict by construction: the token's `alg` must be in KU_SSO_ALGORITHMS (and in
`SUPPORTED`, so `none` never passes); HS* tokens are checked only against the
shared secret, RS*/ES* tokens only against a JWKS key of the matching type, so
neither key can stand in for the other (the classic "HS256 signed with the RSA
public key" forgery fails). `exp` is required; `nbf`, `iat`, `iss` and `aud` are
checked with KU_SSO_LEEWAY_SECONDS of clock skew.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import httpx
from jose import jwk, jwt
from jose.exceptions import JOSEError

from services.auth.config import AuthSettings
from services.kit.errors import ServiceUnavailable, Unauthorized

log = logging.getLogger("ku.auth.sso")

SUPPORTED = frozenset({"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384"})
_KTY = {"RS": "RSA", "ES": "EC"}
_USER_ID = re.compile(r"^[A-Za-z0-9._@:-]{1,128}$")
# An unknown `kid` refetches the JWKS URL at most this often.
_REFETCH_SECONDS = 30.0
# What the caller is told, from a fixed vocabulary (jose's own text is only logged):
# the first of these whose key appears in jose's message.
_REASONS = (
    ('"aud"', 'missing "aud" claim'),
    ("audience", "wrong audience"),
    ('"iss"', 'missing "iss" claim'),
    ('"exp"', 'missing "exp" claim'),
    ("issuer", "wrong issuer"),
    ("nbf", "not yet valid (nbf)"),
    ("expired", "expired"),
    ("Signature", "bad Signature"),
)


def _reason(exc: Exception) -> str:
    text = str(exc)
    return next((ours for key, ours in _REASONS if key in text), "malformed token")


@dataclass(frozen=True)
class SsoIdentity:
    user_id: str
    email: str | None
    name: str | None


def invalid(reason: str) -> Unauthorized:
    return Unauthorized("Invalid SSO token", code="invalid_sso_token", reason=reason)


class SsoVerifier:
    def __init__(self, settings: AuthSettings, http: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        self.allowed = [a for a in settings.sso_algorithm_list if a in SUPPORTED]
        self.http = http
        self._inline: list[dict[str, Any]] | None = (
            _parse_jwks(settings.sso_jwks) if settings.sso_jwks else None
        )
        self._fetched: list[dict[str, Any]] = []
        self._fetched_at = 0.0
        self._attempted_at = float("-inf")
        self._lock = asyncio.Lock()

    @property
    def configured(self) -> bool:
        return bool(self.settings.sso_hs256_secret or self._inline or self.settings.sso_jwks_url)

    async def verify(self, token: str) -> SsoIdentity:
        if not self.configured:
            raise ServiceUnavailable("SSO is not configured", code="sso_not_configured")
        if self.settings.is_production and not (
            self.settings.sso_issuer and self.settings.sso_audience
        ):
            raise ServiceUnavailable(
                "SSO needs KU_SSO_ISSUER and KU_SSO_AUDIENCE in production",
                code="sso_not_configured",
            )
        try:
            header = jwt.get_unverified_header(token)
        except JOSEError:
            raise invalid("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.allowed:
            raise invalid("algorithm not allowed")
        key: Any
        if alg.startswith("HS"):
            if not self.settings.sso_hs256_secret:
                raise invalid("algorithm not allowed")
            key = self.settings.sso_hs256_secret
        else:
            key = await self._public_key(alg, header.get("kid"))
        audience = self.settings.sso_audience or None
        issuer = self.settings.sso_issuer or None
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=audience,
                issuer=issuer,
                options={
                    "leeway": self.settings.sso_leeway_seconds,
                    "require_exp": True,
                    "verify_aud": audience is not None,
                    "require_aud": audience is not None,
                    "require_iss": issuer is not None,
                    # `sub` is checked below: a numeric id is accepted, as its exact digits.
                    "verify_sub": False,
                },
            )
        except JOSEError as exc:
            # The library's text is logged, never returned: the caller learns the kind.
            log.info("SSO token refused: %s", exc)
            raise invalid(_reason(exc)) from None
        return SsoIdentity(
            user_id=_subject(claims.get("sub")),
            email=_optional_str(claims.get("email")),
            name=_optional_str(claims.get("name")),
        )

    async def _public_key(self, alg: str, kid: Any) -> Any:
        kty = _KTY[alg[:2]]
        keys = self._inline if self._inline is not None else await self._remote_keys(kid)
        candidates = [
            k
            for k in keys
            if k.get("kty") == kty
            and k.get("use", "sig") == "sig"
            and k.get("alg", alg) == alg
            and (kid is None or k.get("kid") == kid)
        ]
        if len(candidates) != 1:
            raise invalid("no matching key" if not candidates else "ambiguous key (send a kid)")
        try:
            return jwk.construct(candidates[0], alg)
        except JOSEError:
            raise invalid("unusable key") from None

    async def _remote_keys(self, kid: Any) -> list[dict[str, Any]]:
        url = self.settings.sso_jwks_url
        if not url:
            return []
        known = kid is None or any(k.get("kid") == kid for k in self._fetched)
        fresh = time.monotonic() - self._fetched_at < self.settings.sso_jwks_cache_seconds
        if self._fetched and fresh and known:
            return self._fetched
        # Stale, or an unknown kid (the site may have rotated its keys): refetch, but at
        # most every _REFETCH_SECONDS, so forged kids cannot hammer the main site.
        async with self._lock:
            if time.monotonic() - self._attempted_at < _REFETCH_SECONDS:
                return self._fetched
            self._attempted_at = time.monotonic()
            try:
                client = self.http or httpx.AsyncClient(timeout=5.0)
                try:
                    response = await client.get(url)
                    response.raise_for_status()
                    self._fetched = _parse_jwks(response.text)
                finally:
                    if self.http is None:
                        await client.aclose()
                self._fetched_at = time.monotonic()
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("SSO JWKS fetch from %s failed: %s", url, exc)
                if not self._fetched:
                    self._attempted_at = float("-inf")  # nothing to fall back on: retry
                    raise ServiceUnavailable(
                        "SSO keys are unavailable", code="sso_keys_unavailable"
                    ) from None
        return self._fetched


def _parse_jwks(raw: str) -> list[dict[str, Any]]:
    data = json.loads(raw)
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list):
        raise ValueError("a JWKS is a JSON object with a `keys` list")
    return [k for k in keys if isinstance(k, dict)]


def _subject(sub: Any) -> str:
    if isinstance(sub, int) and not isinstance(sub, bool):
        sub = str(sub)
    if not isinstance(sub, str) or not _USER_ID.match(sub):
        raise invalid("missing or invalid sub")
    return sub


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
