from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwk, jwt

from services.auth.config import AuthSettings
from services.auth.tokens.signing import KeyRing, load_keyring, load_pem


def pem(key) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


class TestSigningKeys:
    def test_ec_p256_key_signs_es256(self):
        pair = load_pem(pem(ec.generate_private_key(ec.SECP256R1())))
        assert pair.algorithm == "ES256" and pair.public_jwk["crv"] == "P-256"
        assert "d" not in pair.public_jwk
        ring = KeyRing(pair)
        token = ring.sign({"sub": "1", "aud": "ku", "iss": "ku-auth", "exp": 9_999_999_999})
        (public,) = ring.jwks()["keys"]
        assert jwt.get_unverified_header(token)["kid"] == public["kid"] == pair.kid
        claims = jwt.decode(
            token, jwk.construct(public, "ES256"), algorithms=["ES256"], audience="ku"
        )
        assert claims["sub"] == "1"

    def test_weak_or_unsupported_keys_are_refused(self):
        with pytest.raises(RuntimeError, match="2048"):
            load_pem(pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
        with pytest.raises(RuntimeError, match="P-256"):
            load_pem(pem(ec.generate_private_key(ec.SECP384R1())))
        with pytest.raises(RuntimeError, match="PEM"):
            load_pem("not a pem")

    async def test_production_requires_a_configured_key(self, sessions):
        settings = AuthSettings(environment="production", auth_private_key="")
        with pytest.raises(RuntimeError, match="KU_AUTH_PRIVATE_KEY"):
            await load_keyring(settings, sessions)
