from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from jose import jwk
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.kit.testing.plugin import asgi_client
from tests.auth.helpers import SSO_AUDIENCE, SSO_ISSUER, SSO_KID, SSO_SECRET
from tests.keys import rsa_pem_pair


@dataclass(frozen=True)
class RsaPair:
    private_pem: str
    public_pem: str
    public_jwk: dict[str, Any]


def make_rsa(kid: str = SSO_KID) -> RsaPair:
    private_pem, public_pem = rsa_pem_pair()
    public = jwk.construct(public_pem, "RS256").to_dict()
    public = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in public.items()}
    return RsaPair(private_pem, public_pem, {**public, "kid": kid, "use": "sig"})


@pytest.fixture(scope="session")
def sso_rsa() -> RsaPair:
    """The main site's RSA key (its public half is in the auth service's JWKS)."""
    return make_rsa()


@pytest.fixture(scope="session")
def attacker_rsa() -> RsaPair:
    """Another RSA key under the same kid: never trusted."""
    return make_rsa()


@pytest.fixture(scope="session")
def auth_settings(ku_database_url: str, sso_rsa: RsaPair) -> Any:
    from services.auth.config import AuthSettings

    return AuthSettings(
        database_url=ku_database_url,
        sso_algorithms="HS256,RS256",
        sso_hs256_secret=SSO_SECRET,
        sso_jwks=json.dumps({"keys": [sso_rsa.public_jwk]}),
        sso_issuer=SSO_ISSUER,
        sso_audience=SSO_AUDIENCE,
    )


@pytest.fixture(scope="session")
async def auth_app(auth_settings: Any) -> AsyncIterator[Any]:
    from services.auth.app import create_app

    app = create_app(auth_settings)
    async with asgi_client(app) as client:
        app.state.test_client = client
        yield app


@pytest.fixture(scope="session")
async def auth(auth_app: Any) -> httpx.AsyncClient:
    return auth_app.state.test_client


@pytest.fixture(scope="session")
def sessions(auth_app: Any) -> async_sessionmaker[AsyncSession]:
    """The auth app's own sessionmaker, for looking at rows directly."""
    return auth_app.state.sessionmaker


@pytest.fixture(scope="session")
async def redis(ku_database_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(os.environ["KU_REDIS_URL"])
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def auth_stream() -> str:
    return f"{os.environ['KU_BUS_PREFIX']}.events.auth"
