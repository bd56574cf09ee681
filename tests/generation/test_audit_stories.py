"""Audit: a story whose chapter cannot be charged because the ledger is unreachable for
a moment is resumed, not failed.

A part is `generated` (its text stored, the user can read it) before its capture.
When the capture fails because the ledger cannot be reached (502/503/504 after the
client's retries), failing the story released that part's hold: the user kept a
chapter for free and lost the rest of the story to a blip. The design already has
the answer: a `generated` part is captured by the runner that resumes the story once
its lease runs out (idempotent by hold id).

In-process: the real stories runner on the real database, a provider and a ledger
stand-in (the first capture of chapter 1 finds the ledger unreachable).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import pytest
from sqlalchemy import select

from services.generation.catalog import Catalog
from services.generation.models import Story, StoryPart
from services.generation.providers import Message, Served
from services.generation.service import Caller
from services.generation.stories import Stories
from services.kit.config import KuSettings
from services.kit.db import create_engine, sessionmaker_for
from services.kit.errors import UpstreamError


class Router:
    async def stream(
        self,
        model: Any,
        messages: Sequence[Message],
        *,
        max_words: int,
        temperature: float,
        served: list[Served],
    ) -> AsyncGenerator[str, None]:
        served.append(Served(model, "fake", False))
        for word in ("alpha ", "beta ", "gamma ", "delta"):
            yield word


class Billing:
    def __init__(self) -> None:
        self.holds = 0
        self.captured: list[tuple[str, int]] = []
        self.released: list[str] = []
        self.unreachable_once = {"h1"}

    async def hold(self, **_: Any) -> str:
        hold_id = f"h{self.holds}"
        self.holds += 1
        return hold_id

    async def settle(self, hold_id: str, cost_milli: int) -> None:
        if hold_id in self.unreachable_once:
            self.unreachable_once.discard(hold_id)
            raise UpstreamError("The ledger service is unreachable", service="ledger")
        self.captured.append((hold_id, cost_milli))

    async def release(self, hold_id: str) -> None:
        self.released.append(hold_id)


async def test_a_ledger_blip_at_a_chapters_capture_resumes_the_story(
    ku_database_url: str,
) -> None:
    engine = create_engine(KuSettings(database_url=ku_database_url))
    billing = Billing()
    stories = Stories(
        catalog=Catalog(
            [{"id": "m", "multiplier_milli": 1000}], default_provider="fake", offline=False
        ),
        router=Router(),  # type: ignore[arg-type]
        billing=billing,  # type: ignore[arg-type]
        sessionmaker=sessionmaker_for(engine),
        lease_seconds=0.3,
        hold_ttl_seconds=3600,
    )
    try:
        story_id = await stories.submit(
            Caller(user_id=f"u-{uuid.uuid4().hex[:8]}", app="penora", origin=None),
            model=stories.catalog.get("m"),
            premise="A lighthouse",
            title=None,
            chapters=2,
            words_per_chapter=20,
            temperature=0.5,
        )
        for _ in range(100):  # the first runner, then whoever takes the story over
            await asyncio.gather(*stories.tasks.values(), return_exceptions=True)
            async with sessionmaker_for(engine)() as session:
                story = await session.get(Story, story_id)
            assert story is not None
            if story.status != "running":
                break
            await asyncio.sleep(0.1)
            await stories.renew_and_claim()
        async with sessionmaker_for(engine)() as session:
            story = await session.get(Story, story_id)
            parts = (
                await session.scalars(
                    select(StoryPart).where(StoryPart.story_id == story_id).order_by(StoryPart.n)
                )
            ).all()
        assert story is not None
        assert (story.status, story.error) == ("completed", None)
        assert [p.status for p in parts] == ["charged"] * 3
        # Each part charged once for its 4 words (x1: 40 milli-Ku); nothing released.
        assert billing.captured == [("h0", 40), ("h1", 40), ("h2", 40)]
        assert billing.released == []
    finally:
        await stories.stop()
        await engine.dispose()


async def test_a_story_that_cannot_be_recorded_releases_its_holds(ku_database_url: str) -> None:
    """Every part is held before the story's rows are written; if writing them fails
    (the database unreachable), the holds go back at once, not after the story's
    6-hour hold TTL with the user's credit locked meanwhile."""
    broken = ku_database_url.rsplit("/", 1)[0] + f"/missing_{uuid.uuid4().hex[:8]}"
    engine = create_engine(KuSettings(database_url=broken))
    billing = Billing()
    stories = Stories(
        catalog=Catalog(
            [{"id": "m", "multiplier_milli": 1000}], default_provider="fake", offline=False
        ),
        router=Router(),  # type: ignore[arg-type]
        billing=billing,  # type: ignore[arg-type]
        sessionmaker=sessionmaker_for(engine),
        lease_seconds=0.3,
        hold_ttl_seconds=3600,
    )
    try:
        with pytest.raises(Exception):  # noqa: B017 - whatever the database raised
            await stories.submit(
                Caller(user_id="u-story", app="penora", origin=None),
                model=stories.catalog.get("m"),
                premise="A lighthouse",
                title=None,
                chapters=2,
                words_per_chapter=20,
                temperature=0.5,
            )
        assert sorted(billing.released) == ["h0", "h1", "h2"]
        assert stories.tasks == {}
    finally:
        await engine.dispose()
