"""The gateway in front of the real auth and ledger apps, all served in this process by
uvicorn on free loopback ports (the gateway's client speaks real HTTP to them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn

from services.kit.runner import free_port
from tests.gateway.helpers import SigningKey, create_key, make_signing_key


class Served:
    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # type: ignore[attr-defined]
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Served:
        self.task = asyncio.create_task(self.server.serve())
        for _ in range(500):
            if self.server.started:
                return self
            if self.task.done():
                self.task.result()
            await asyncio.sleep(0.01)
        raise RuntimeError("server did not start")

    async def __aexit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task


@dataclass
class Stack:
    auth: httpx.AsyncClient  # straight to auth (admin API for test setup)
    ledger: httpx.AsyncClient  # straight to the ledger
    signing: SigningKey
    auth_url: str
    ledger_url: str
    gateway_url: str

    def gateway_settings(self, **overrides: Any) -> Any:
        from gateway.config import GatewaySettings

        return GatewaySettings(
            auth_url=self.auth_url,
            ledger_url=self.ledger_url,
            workspace_url="http://127.0.0.1:9",
            **overrides,
        )


@pytest.fixture(scope="session")
async def stack(ku_database_url: str) -> AsyncIterator[Stack]:
    from gateway.app import create_app as create_gateway
    from gateway.config import GatewaySettings
    from services.auth.app import create_app as create_auth
    from services.auth.config import AuthSettings
    from services.ledger.app import create_app as create_ledger

    signing = make_signing_key()
    auth_settings = AuthSettings(auth_private_key=signing.private_pem, auth_key_id=signing.kid)
    ledger_app = create_ledger()
    async with Served(create_auth(auth_settings)) as auth, Served(ledger_app) as ledger:
        # This ledger runs on the session's event loop, which stands still between async
        # tests. Its consumer of auth's events (the "ledger" group every suite's ledger
        # shares) would still be handed entries by Redis while it stands still, and hold
        # them until the group's 30 s reclaim: another suite's new user would wait that
        # long for its account. These tests open their accounts directly.
        await ledger_app.state.user_created_consumer.stop()
        settings = GatewaySettings(
            auth_url=auth.url,
            ledger_url=ledger.url,
            workspace_url="http://127.0.0.1:9",
            gateway_rate_per_ip=100_000,
        )
        async with Served(create_gateway(settings)) as gw:
            async with (
                httpx.AsyncClient(base_url=auth.url) as a,
                httpx.AsyncClient(base_url=ledger.url) as lg,
            ):
                yield Stack(a, lg, signing, auth.url, ledger.url, gw.url)


@pytest.fixture
async def gw(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=10) as client:
        yield client


@pytest.fixture(scope="session")
async def app_key(stack: Stack) -> str:
    """An ImageGene key with the scopes the old integration used."""
    key, _ = await create_key(
        stack.auth, "imagegene", ["ledger:read", "ledger:write", "users:write"]
    )
    return key


@pytest.fixture(scope="session")
async def admin_key(stack: Stack) -> str:
    key, _ = await create_key(stack.auth, "ops", ["admin"])
    return key
