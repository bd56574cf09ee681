"""A real suite (auth, ledger, workspace, gateway processes) for the client's tests; keys
and users are made with the `ku` CLI, as an operator would."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from services.kit.runner import Suite
from tests.gateway.helpers import make_signing_key, new_user_id

pytestmark = pytest.mark.e2e

# The app "burst" gets 3 requests per 2-second window, to see 429 and Retry-After.
RATE_WINDOW_SECONDS = 2
BURST_LIMIT = 3


def wait_for_account(gateway: str, key: str, user_id: str) -> None:
    """The ledger opens the account from the `user.created` event: wait until it has."""
    with httpx.Client(base_url=gateway, headers={"x-api-key": key}, timeout=10) as http:
        for _ in range(150):
            r = http.get("/v1/ledger/balance", params={"user_id": user_id})
            if r.status_code == 200:
                return
            time.sleep(0.1)
    raise AssertionError(f"no ledger account for {user_id} after 15 s")


@dataclass
class Ku:
    suite: Suite
    _reader: str | None = None

    @property
    def url(self) -> str:
        return self.suite.urls["gateway"]

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "services.cli", *args],
            env=self.suite.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def key(self, app: str, scopes: str) -> str:
        """A key from `ku keys create`; Penora's and ImageGene's (and this suite's own
        reader) are first-party (`users:any`), as they are issued in production."""
        if app in ("penora", "imagegene", "test-reader") and "users:any" not in scopes:
            scopes += ",users:any"
        return self.cli("keys", "create", "--app", app, "--scopes", scopes)

    def user(self) -> str:
        """A new user with the welcome credits (50 Ku), once the ledger has opened it."""
        user_id = new_user_id()
        self.cli("users", "create", "--id", user_id, "--email", f"{user_id}@example.com")
        wait_for_account(self.url, self.reader(), user_id)
        return user_id

    def reader(self) -> str:
        if self._reader is None:
            self._reader = self.key("test-reader", "ledger:read")
        return self._reader


@pytest.fixture(scope="package")
def ku(ku_database_url: str) -> Iterator[Ku]:
    signing = make_signing_key()
    env = {
        **os.environ,
        "KU_DATABASE_URL": ku_database_url,
        "KU_AUTH_PRIVATE_KEY": signing.private_pem,
        "KU_AUTH_KEY_ID": signing.kid,
        "KU_GATEWAY_RATE_WINDOW_SECONDS": str(RATE_WINDOW_SECONDS),
        "KU_GATEWAY_RATE_APPS": f'{{"burst": {BURST_LIMIT}}}',
        "KU_LOG_LEVEL": "WARNING",
        # Small pools: the test server's connections are shared with every other run.
        "KU_DB_POOL_SIZE": "2",
        "KU_DB_MAX_OVERFLOW": "2",
        "KU_WRITE_POOL_SIZE": "2",
    }
    with Suite(
        env,
        only=["auth", "ledger", "workspace", "gateway"],
        free_ports=True,
        migrate=False,
        quiet=True,
        ready_timeout=45,
    ) as suite:
        yield Ku(suite)


@pytest.fixture(scope="package")
def app_key(ku: Ku) -> str:
    """What an app like ImageGene holds: no grants, no admin."""
    return ku.key("imagegene", "ledger:read,ledger:write,workspace:read,workspace:write")


@pytest.fixture(scope="package")
def admin_key(ku: Ku) -> str:
    return ku.key("ops", "admin")
