"""The real processes (auth, ledger, workspace, gateway) started by `ku up`'s `Suite` on free ports,
against this test run's database and Redis prefix. Everything goes through the gateway;
setup uses the `ku` command line, as an operator would."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from services.kit.runner import Suite
from services.kit.testing.plugin import ku_cli
from tests.gateway.helpers import SigningKey, make_signing_key

pytestmark = pytest.mark.e2e

# The main site's HS256 SSO secret, as this suite's auth is configured.
SSO_SECRET = "e2e-sso-shared-secret-0123456789abcdef"


@dataclass
class E2E:
    suite: Suite
    signing: SigningKey

    @property
    def gateway(self) -> str:
        return self.suite.urls["gateway"]

    def ku(self, *args: str) -> str:
        """Run the `ku` CLI with the suite's environment; its stdout."""
        return ku_cli(self.suite.env, *args)

    def new_key(self, app: str, scopes: str) -> str:
        """A key made with `ku keys create`; Penora's and ImageGene's are first-party
        (`users:any`), as they are issued in production."""
        if app in ("penora", "imagegene") and "users:any" not in scopes:
            scopes += ",users:any"
        return self.ku("keys", "create", "--app", app, "--scopes", scopes)


@pytest.fixture(scope="session")
def e2e(ku_database_url: str) -> Iterator[E2E]:
    signing = make_signing_key()
    env = {
        **os.environ,
        "KU_DATABASE_URL": ku_database_url,
        "KU_AUTH_PRIVATE_KEY": signing.private_pem,
        "KU_AUTH_KEY_ID": signing.kid,
        "KU_SSO_HS256_SECRET": SSO_SECRET,
        # The app "burst" gets a tiny per-key limit, to show 429 across two gateways.
        "KU_GATEWAY_RATE_APPS": '{"burst": 5}',
        "KU_LOG_LEVEL": "WARNING",
    }
    with Suite(
        env,
        only=["auth", "ledger", "workspace", "gateway"],
        free_ports=True,
        migrate=False,
        quiet=True,
        ready_timeout=45,
    ) as suite:
        yield E2E(suite, signing)
