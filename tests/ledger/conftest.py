from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from services.kit.testing.plugin import asgi_client
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
