"""A real suite for the client's tests: every process `ku up` runs (the services, the
worker and the gateway: `available_processes()`), generation on its offline provider;
keys and users are made with the `ku` CLI, as an operator would."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from services.kit.runner import Suite, available_processes
from tests.gateway.helpers import make_signing_key
from tests.ku_suite import Ku

pytestmark = pytest.mark.e2e

# The app "burst" gets 3 requests per 2-second window, to see 429 and Retry-After.
RATE_WINDOW_SECONDS = 2
BURST_LIMIT = 3


@pytest.fixture(scope="package")
def ku(ku_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ku]:
    signing = make_signing_key()
    env = {
        **os.environ,
        "KU_DATABASE_URL": ku_database_url,
        "KU_AUTH_PRIVATE_KEY": signing.private_pem,
        "KU_AUTH_KEY_ID": signing.kid,
        "KU_GATEWAY_RATE_WINDOW_SECONDS": str(RATE_WINDOW_SECONDS),
        "KU_GATEWAY_RATE_APPS": f'{{"burst": {BURST_LIMIT}}}',
        "KU_GENERATION_OFFLINE": "true",
        "KU_ENHANCEMENT_STORAGE_DIR": str(tmp_path_factory.mktemp("enhancement")),
        "KU_LOG_LEVEL": "WARNING",
        # Small pools: the test server's connections are shared with every other run.
        "KU_DB_POOL_SIZE": "2",
        "KU_DB_MAX_OVERFLOW": "2",
        "KU_WRITE_POOL_SIZE": "2",
        "KU_GENERATION_RECORDS_POOL_SIZE": "2",
    }
    with Suite(
        env,
        only=available_processes(),
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
