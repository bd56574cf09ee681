"""Internal principals: audience-bound, and only the gateway vouches for users, apps and
admins; a service's key signs only itself (services/kit/principal.py)."""

from __future__ import annotations

import time

import pytest

from services.kit.config import KuSettings
from services.kit.errors import Forbidden, Unauthorized
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


class TestOriginCache:
    """A forwarded origin is verified once per header (like the caller's own header),
    and the cache never lets through what the check would refuse."""

    @staticmethod
    def origin(header: str):
        from starlette.requests import Request

        from services.kit.principal import origin_principal

        request = Request({"type": "http", "headers": [(b"x-ku-origin", header.encode())]})
        return origin_principal(request, GENERATION)

    def test_verified_once_then_served_from_the_cache(self, monkeypatch: pytest.MonkeyPatch):
        from services.kit import principal as module

        calls: list[str] = []
        real = module.verify_principal

        def counting(header: str, **kwargs):
            calls.append(header)
            return real(header, **kwargs)

        monkeypatch.setattr(module, "verify_principal", counting)
        header = sign_principal(USER, audience="generation", issuer="gateway")
        assert self.origin(header) == USER
        assert self.origin(header) == USER
        assert calls == [header]

    def test_a_cached_origin_past_its_allowance_is_refused(self, monkeypatch: pytest.MonkeyPatch):
        from services.kit import principal as module

        header = sign_principal(USER, audience="generation", issuer="gateway")
        assert self.origin(header) == USER  # cached now
        later = time.time() + module.HEADER_TTL_SECONDS + module.ORIGIN_MAX_AGE_SECONDS + 5
        monkeypatch.setattr(module.time, "time", lambda: later)
        with pytest.raises(Unauthorized) as caught:
            self.origin(header)
        assert caught.value.detail.get("reason") == "expired"

    def test_a_tampered_or_service_signed_origin_is_refused_after_a_good_one(self):
        good = sign_principal(USER, audience="generation", issuer="gateway")
        assert self.origin(good) == USER
        body, mac = good.split(".", 1)
        tampered = body + "." + ("A" if mac[0] != "A" else "B") + mac[1:]
        with pytest.raises(Unauthorized):
            self.origin(tampered)
        itself = sign_principal(GENERATION, audience="generation", issuer="generation")
        for _ in range(2):  # refused when verified and when found in the cache
            with pytest.raises(Unauthorized):
                self.origin(itself)


class TestAdminScope:
    """The admin scope is held only by an admin key or account: a service signs its own principal
    and could list any scope in it, so no check that asks for "admin" may pass it."""

    def test_a_service_listing_admin_is_not_an_admin(self):
        forged = Principal(kind="service", app="generation", scopes=frozenset({"admin"}))
        assert not forged.has_scope("admin")
        with pytest.raises(Forbidden):
            forged.require_scope("admin")
        # ...and it holds no other scope through it either.
        assert not forged.has_scope("ledger:grant")

    def test_an_admin_key_and_an_admin_account_are(self):
        account = Principal(kind="user", app="penora", user_id="1", scopes=frozenset({"admin"}))
        for admin in (ADMIN, account):
            assert admin.has_scope("admin")
            assert admin.has_scope("ledger:grant")
            admin.require_scope("admin")
