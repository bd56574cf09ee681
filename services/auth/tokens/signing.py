"""The key that signs Ku access tokens, and its public half at /.well-known/jwks.json.

Where the key comes from:
- `KU_AUTH_PRIVATE_KEY` (PEM) when set: RSA (>= 2048 bits) signs RS256, EC P-256
  signs ES256; `kid` is `KU_AUTH_KEY_ID` or the key's RFC 7638 thumbprint. Required
  when KU_ENVIRONMENT is anything but development or test.
- otherwise (development and test only) an RSA key generated on first start and
  kept in `auth.signing_keys`, so every auth process, and every restart, signs
  with the same key and the gateway's cached JWKS stays valid. The first process
  to start creates it under an advisory lock; the others read it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwk, jwt
from jose.backends.base import Key
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.auth.config import AuthSettings
from services.auth.tokens.repository import TokenRepository
from services.kit.db import unit_of_work


@dataclass(frozen=True)
class SigningKeyPair:
    kid: str
    algorithm: str
    private_key: Key
    public_jwk: dict[str, Any]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def thumbprint(public_jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (sha256, base64url)."""
    members = ("e", "kty", "n") if public_jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = json.dumps({m: public_jwk[m] for m in members}, separators=(",", ":"))
    return _b64(hashlib.sha256(canonical.encode()).digest())


def load_pem(pem: str, kid: str | None = None) -> SigningKeyPair:
    """A signing key from a PEM private key (RSA -> RS256, EC P-256 -> ES256)."""
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise RuntimeError(f"KU_AUTH_PRIVATE_KEY is not a usable PEM private key: {exc}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise RuntimeError("KU_AUTH_PRIVATE_KEY: RSA keys must have at least 2048 bits")
        algorithm = "RS256"
    elif isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        algorithm = "ES256"
    else:
        raise RuntimeError("KU_AUTH_PRIVATE_KEY must be an RSA or EC P-256 private key")
    private = jwk.construct(pem, algorithm)
    public = private.public_key().to_dict()
    public = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in public.items()}
    kid = kid or thumbprint(public)
    return SigningKeyPair(kid, algorithm, private, {**public, "kid": kid, "use": "sig"})


def generate_rsa_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


class KeyRing:
    """Signs with the active key; publishes every key a live token may carry."""

    def __init__(self, active: SigningKeyPair, published: list[SigningKeyPair] | None = None):
        self.active = active
        self.published = published or [active]

    def sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(
            claims,
            self.active.private_key,
            algorithm=self.active.algorithm,
            headers={"kid": self.active.kid},
        )

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.public_jwk for k in self.published]}


async def load_keyring(
    settings: AuthSettings, sessionmaker: async_sessionmaker[AsyncSession]
) -> KeyRing:
    if settings.auth_private_key:
        return KeyRing(load_pem(settings.auth_private_key, settings.auth_key_id or None))
    if settings.is_production:
        raise RuntimeError(
            "KU_AUTH_PRIVATE_KEY must be set outside development/test "
            "(a PEM RSA or EC P-256 private key)"
        )
    async with unit_of_work(sessionmaker) as session:
        row = await TokenRepository(session).dev_signing_key(create=_new_dev_key)
    return KeyRing(load_pem(row.private_pem, row.kid))


def _new_dev_key() -> tuple[str, str, str]:
    pem = generate_rsa_pem()
    pair = load_pem(pem)
    return pair.kid, pair.algorithm, pem
