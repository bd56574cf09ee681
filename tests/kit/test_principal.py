"""Internal principals: audience-bound, and only the gateway vouches for users, apps and
admins; a service's key signs only itself (services/kit/principal.py)."""

from __future__ import annotations

import time

import pytest

from services.kit.config import KuSettings
from services.kit.errors import Unauthorized
from services.kit.principal import (
    Principal,
    generate_keypair,
    sign_principal,
    verify_principal,
)

ADMIN = Principal(kind="app", app="ops", scopes=frozenset({"admin"}))
USER = Principal(kind="user", app="penora", user_id="101902121794505144784")
GENERATION = Principal(kind="service", app="generation")


def refused(header: str, audience: str = "ledger") -> str:
    with pytest.raises(Unauthorized) as caught:
        verify_principal(header, audience=audience)
    return str(caught.value.detail.get("reason"))


class TestAudience:
    def test_a_principal_for_the_workspace_is_refused_by_the_ledger(self):
        header = sign_principal(ADMIN, audience="workspace", issuer="gateway")
        assert verify_principal(header, audience="workspace").principal == ADMIN
        assert refused(header, "ledger") == "principal is for another service"


class TestIssuers:
    @pytest.mark.parametrize("forged", [ADMIN, USER, Principal(kind="service", app="billing")])
    def test_a_service_key_cannot_mint_anyone_but_itself(self, forged: Principal):
        # The generation process holds only its own key: whatever it signs says
        # issuer=generation, and that issuer may only vouch for service:generation.
        header = sign_principal(forged, audience="ledger", issuer="generation")
        assert refused(header) == "issuer may not sign this principal"
        own = sign_principal(GENERATION, audience="ledger", issuer="generation")
        assert verify_principal(own, audience="ledger").principal == GENERATION

    def test_a_key_nobody_trusts_is_refused(self):
        stranger = KuSettings(principal_signing_keys=f"gateway:{generate_keypair()[0]}")
        header = sign_principal(ADMIN, audience="ledger", issuer="gateway", settings=stranger)
        assert refused(header) == "bad signature"

    def test_an_unknown_issuer_is_refused(self):
        stranger = KuSettings(principal_signing_keys=f"mallory:{generate_keypair()[0]}")
        header = sign_principal(ADMIN, audience="ledger", issuer="mallory", settings=stranger)
        assert refused(header) == "unknown issuer"

    def test_a_tampered_body_is_refused(self):
        import base64

        import orjson

        header = sign_principal(USER, audience="ledger", issuer="gateway")
        body, sig = header.split(".")
        data = orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        data["s"] = ["admin"]
        forged = base64.urlsafe_b64encode(orjson.dumps(data)).rstrip(b"=").decode()
        assert refused(f"{forged}.{sig}") == "bad signature"


class TestExpiry:
    def test_an_expired_principal_is_refused(self):
        header = sign_principal(ADMIN, audience="ledger", issuer="gateway", now=time.time() - 61)
        assert refused(header) == "expired"
