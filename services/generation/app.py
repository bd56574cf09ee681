"""The generation service (Penora's engine): providers, model catalog, pricing,
single prompts, writing tools, stories and an OpenAI-compatible face."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.generation.api import routers
from services.generation.billing import Billing
from services.generation.catalog import Catalog
from services.generation.config import GenerationSettings, get_settings
from services.generation.models import SCHEMA
from services.generation.providers import Router, build_providers, check_production
from services.generation.records import Records
from services.generation.service import GenerationEngine, drain_background
from services.generation.stories import Stories, StoryLeases
from services.kit.app import create_service_app
from services.kit.db import plain_url
from services.kit.front import FrontApp
from services.kit.service_client import ServiceClient

DESCRIPTION = """
Penora's engine: text generation charged in Ku, by the word.

Price: 1 Ku per 100 output words × the model's multiplier, exact to the milli-Ku
(words are runs of non-whitespace). Every generation holds its maximum cost first
(402 before any provider call if it cannot), then captures the words delivered and
releases the rest; a provider failure or timeout costs nothing, a stream the
client leaves costs only the words it received. `POST /v1/generation/estimate`
previews the cost. Stories report progress per chapter on `/v1/events`.
The OpenAI-compatible `chat/completions` and `models` work with the `openai` package
(`base_url=<gateway>/v1/generation`).
"""


def catalog_from(settings: GenerationSettings) -> Catalog:
    default_provider = next(iter(settings.generation_providers), "offline")
    return Catalog(
        settings.generation_models,
        default_provider=default_provider,
        offline=settings.generation_offline,
    )


def create_app() -> FastAPI:
    settings = get_settings()
    # Fail at startup, not at the first request: production never serves offline text.
    catalog = catalog_from(settings)
    check_production(settings, catalog)

    @asynccontextmanager
    async def generation(app: FastAPI) -> AsyncIterator[None]:
        client = ServiceClient(settings, me="generation")
        router = Router(settings, catalog, build_providers(settings), app.state.redis)
        billing = Billing(client, settings.generation_hold_ttl_seconds)
        records = Records(
            plain_url(settings.database_url), pool_size=settings.generation_records_pool_size
        )
        await records.open()
        app.state.service_client = client
        app.state.generation = GenerationEngine(
            catalog=catalog,
            router=router,
            billing=billing,
            sessionmaker=app.state.sessionmaker,
            records=records,
        )
        stories = Stories(
            catalog=catalog,
            router=router,
            billing=billing,
            sessionmaker=app.state.sessionmaker,
            lease_seconds=settings.generation_story_lease_seconds,
            hold_ttl_seconds=settings.generation_story_hold_ttl_seconds,
        )
        app.state.stories = stories
        leases = StoryLeases(stories)
        leases.start()
        try:
            yield
        finally:
            await leases.stop()
            await stories.stop()
            await drain_background()
            await router.aclose()
            await billing.aclose()
            await records.close()
            await client.aclose()

    return create_service_app(
        name="generation",
        settings=settings,
        routers=routers,
        title="Ku Generation",
        description=DESCRIPTION,
        outbox_schema=SCHEMA,
        hooks=[generation],
        app_class=FrontApp,
    )
