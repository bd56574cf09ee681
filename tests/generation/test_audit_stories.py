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

    async def settle(self, hold_id: str, cost_milli: int) -> int:
        if hold_id in self.unreachable_once:
            self.unreachable_once.discard(hold_id)
            raise UpstreamError("The ledger service is unreachable", service="ledger")
        self.captured.append((hold_id, cost_milli))
        return cost_milli

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


class SlowRouter(Router):
    """Chapter 1 waits until the test lets it go (a runner stalled past its lease)."""

    def __init__(self, words: tuple[str, ...]) -> None:
        self.words = words
        self.go_on = asyncio.Event()
        self.waiting = asyncio.Event()

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
        if "Write Chapter 1 of" in messages[-1]["content"]:
            self.waiting.set()
            await self.go_on.wait()
        for word in self.words:
            yield word


class SharedLedger(Billing):
    """Holds shared by two runners; a capture is idempotent by hold id (the ledger's
    key is `capture:<hold>`): the same amount replays, another amount is refused."""

    def __init__(self) -> None:
        super().__init__()
        self.unreachable_once = set()
        self.by_hold: dict[str, int] = {}

    async def settle(self, hold_id: str, cost_milli: int) -> int:
        if hold_id in self.by_hold:
            if self.by_hold[hold_id] != cost_milli:
                from services.kit.errors import Conflict

                raise Conflict("key reused", code="idempotency_key_reused")
            return cost_milli
        if hold_id in self.released:
            from services.kit.errors import Conflict

            raise Conflict("released", code="hold_already_released")
        self.by_hold[hold_id] = cost_milli
        self.captured.append((hold_id, cost_milli))
        return cost_milli

    async def release(self, hold_id: str) -> None:
        if hold_id in self.by_hold:
            from services.kit.errors import Conflict

            raise Conflict("captured", code="hold_already_captured")
        self.released.append(hold_id)


async def test_a_runner_that_lost_its_lease_cannot_undo_the_story(ku_database_url: str) -> None:
    """Runner A stalls on chapter 1 past its lease; runner B (another process) takes
    the story over and completes it. When A wakes up, its writes are fenced off: it
    neither overwrites the charged chapter nor fails the completed story."""
    engine = create_engine(KuSettings(database_url=ku_database_url))
    ledger = SharedLedger()
    catalog = Catalog(
        [{"id": "m", "multiplier_milli": 1000}], default_provider="fake", offline=False
    )
    slow, fast = SlowRouter(("a1 ", "a2 ", "a3 ", "a4")), SlowRouter(("b1 ", "b2"))
    fast.go_on.set()

    def runner(router: SlowRouter) -> Stories:
        return Stories(
            catalog=catalog,
            router=router,  # type: ignore[arg-type]
            billing=ledger,  # type: ignore[arg-type]
            sessionmaker=sessionmaker_for(engine),
            lease_seconds=0.3,
            hold_ttl_seconds=3600,
        )

    a, b = runner(slow), runner(fast)
    try:
        story_id = await a.submit(
            Caller(user_id=f"u-{uuid.uuid4().hex[:8]}", app="penora", origin=None),
            model=catalog.get("m"),
            premise="A lighthouse",
            title=None,
            chapters=2,
            words_per_chapter=20,
            temperature=0.5,
        )
        await asyncio.wait_for(slow.waiting.wait(), 5)
        await asyncio.sleep(0.4)  # A's lease runs out (nothing renews it)
        await b.renew_and_claim()
        assert story_id in b.tasks
        await asyncio.wait_for(asyncio.gather(*b.tasks.values()), 10)
        slow.go_on.set()  # A wakes up
        await asyncio.wait_for(asyncio.gather(*a.tasks.values()), 10)
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
        # What is stored is what was charged: B's chapters (2 words, 20 milli-Ku).
        assert [(p.n, p.words, p.cost_milli) for p in parts[1:]] == [(1, 2, 20), (2, 2, 20)]
        assert sorted(ledger.captured) == [("h0", 40), ("h1", 20), ("h2", 20)]
        assert ledger.released == []
    finally:
        await a.stop()
        await b.stop()
        await engine.dispose()
