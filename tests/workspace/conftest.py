from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from services.kit.testing.plugin import asgi_client


@pytest.fixture(scope="session")
async def workspace_app(ku_database_url: str):
    from services.workspace.app import create_app

    return create_app()


@pytest.fixture(scope="session")
async def workspace(workspace_app) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(workspace_app) as client:
        yield client
