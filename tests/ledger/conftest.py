from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from services.kit.testing.plugin import asgi_client, drop_database, migrated_database
from tests.ledger.helpers import key, operator


@pytest.fixture(scope="session")
async def ledger(ku_database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    from services.ledger.app import create_app

    async with asgi_client(create_app()) as client:
        yield client


@pytest.fixture
def funded_user(
    ledger: httpx.AsyncClient, new_user_id: Callable[[], str]
) -> Callable[..., Awaitable[str]]:
    """Open an account (no welcome grant) and grant it `amount` Ku."""

    async def make(amount: float | int = 50, **grant: Any) -> str:
        user_id = new_user_id()
        r = await ledger.post(
            "/v1/ledger/accounts", json={"user_id": user_id, "welcome": False}, headers=operator()
        )
        assert r.status_code == 201, r.text
        if amount:
            r = await ledger.post(
                "/v1/ledger/grants",
                json={"user_id": user_id, "amount": amount, "source": "promo", **grant},
                headers={**operator(), **key()},
            )
            assert r.status_code == 201, r.text
        return user_id

    return make


@pytest.fixture
def scratch_url() -> Iterator[str]:
    """A database of its own on the test server, every service migrated to head; dropped
    after the test (migrations up and down, scratch schemas)."""
    name = f"ku_sql_{secrets.token_hex(4)}"
    yield migrated_database(name)
    asyncio.run(drop_database(name))
