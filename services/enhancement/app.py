"""The enhancement service: NanoBanana-style image enhancement with provider fallback,
platform credit pools, monthly allowances and credit that always comes back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from arq.connections import RedisSettings, create_pool
from fastapi import FastAPI

from services.enhancement.api import routers
from services.enhancement.config import get_settings
from services.enhancement.models import SCHEMA
from services.enhancement.service import Enhancer
from services.enhancement.tasks import arq_enqueuer, consume_subscriptions
from services.kit.app import create_service_app

DESCRIPTION = """
Ku's image enhancement (NanoBanana and fallbacks). `POST /v1/enhancement/tasks`
takes an image by URL, multipart upload or workspace project code, holds its price
in Ku (or uses one of the month's included enhancements), and answers 202 with a
task id; the worker runs it through the provider chain (ordered by health, then
cost; a local Pillow enhancer as the last resort, marked `degraded`). The hold is
captured on success and released on every failure. Progress arrives as
`enhancement.task.updated` events on the user's `/v1/events` stream.

Image URLs are fetched with a size cap, a timeout, content-type and Pillow checks, a
pixel limit, and never from loopback, private, link-local or metadata addresses
(after redirects and DNS resolution). `POST /v1/enhancement/tasks` accepts an
optional `Idempotency-Key` header.
"""


@asynccontextmanager
async def enhancer_hook(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    arq_redis = await create_pool(RedisSettings.from_dsn(settings.redis_url))
    enhancer = Enhancer(
        settings,
        app.state.sessionmaker,
        app.state.redis,
        enqueue=arq_enqueuer(arq_redis, settings),
    )
    app.state.enhancer = enhancer
    try:
        yield
    finally:
        await enhancer.aclose()
        await arq_redis.aclose()


def create_app() -> FastAPI:
    settings = get_settings()
    return create_service_app(
        name="enhancement",
        settings=settings,
        routers=routers,
        title="Ku Enhancement",
        description=DESCRIPTION,
        outbox_schema=SCHEMA,
        hooks=[enhancer_hook, consume_subscriptions],
    )
