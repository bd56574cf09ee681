"""Stories through the gateway: an outline then chapters, a progress event per part on
the user's `/v1/events` stream, a charge per part, and a crash after chapter 2 that
resumes at chapter 3 without charging chapters 1-2 again."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import httpx
import orjson
import pytest

from tests.generation.conftest import Env

pytestmark = pytest.mark.e2e


def milli(ku: float | int) -> int:
    return round(ku * 1000)


async def follow_events(gen: Env, token: str, into: list[dict[str, Any]]) -> None:
    """Collect the user's SSE events (topic + data) until cancelled."""
    async with httpx.AsyncClient(base_url=gen.gateway, timeout=None) as c:
        async with c.stream("GET", "/v1/events", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status_code == 200, await r.aread()
            topic = None
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    topic = line[7:]
                elif line.startswith("data: "):
                    into.append({"topic": topic, **orjson.loads(line[6:])})


async def wait_for(predicate: Any, seconds: float = 30) -> None:
    for _ in range(int(seconds * 10)):
        if predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not reached in time")


class TestStory:
    async def test_three_chapters_killed_after_chapter_2_resume(self, gen: Env) -> None:
        user = gen.funded_user(20)
        token = gen.user_token(user)
        marker = uuid.uuid4().hex
        events: list[dict[str, Any]] = []
        listener = asyncio.create_task(follow_events(gen, token, events))
        await asyncio.sleep(0.5)  # the stream is open before anything happens
        # Chapter 3's request hangs: the process is busy with it when it is killed.
        gen.fake.stall_on = "Write Chapter 3 of 3"
        try:
            async with httpx.AsyncClient(
                base_url=gen.gateway, headers={"Authorization": f"Bearer {token}"}, timeout=30
            ) as c:
                r = await c.post(
                    "/v1/generation/story",
                    json={
                        "premise": f"A lighthouse keeper {marker} #words=40",
                        "chapters": 3,
                        "words_per_chapter": 50,
                        "model": "fake-small",
                    },
                )
                assert r.status_code == 202, r.text
                story_id = r.json()["id"]
                assert [p["status"] for p in r.json()["parts"]] == ["held"] * 4

                def progress() -> list[dict[str, Any]]:
                    return [
                        e
                        for e in events
                        if e["topic"] == "story.progress" and e["story_id"] == story_id
                    ]

                await wait_for(lambda: len(progress()) == 3)  # outline, chapters 1 and 2
                await wait_for(
                    lambda: (
                        bool(gen.fake.seen(f"{marker} #words=40\n\nOutline"))
                        and bool(gen.fake.seen("Write Chapter 3 of 3"))
                    )
                )
                # Each part was held up front, and three of them are charged: 40 words each.
                journal = gen.journal(user)
                assert [t["kind"] for t in journal].count("reserve") == 4
                captures = [t for t in journal if t["kind"] == "capture"]
                assert [milli(t["amount"]) for t in captures] == [400, 400, 400]

                # The stalled request is already in flight; the next one must not stall (the
                # new process may claim the story before `restart_generation` returns).
                gen.fake.stall_on = None
                gen.restart_generation()  # SIGKILL mid chapter 3, and a new process

                await wait_for(
                    lambda: any(
                        e["topic"] == "story.completed" and e["story_id"] == story_id
                        for e in events
                    ),
                    seconds=60,
                )
                r = await c.get(f"/v1/generation/story/{story_id}")
                assert r.status_code == 200, r.text
                story = r.json()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await listener
        assert story["status"] == "completed" and story["runs"] == 2
        assert [p["status"] for p in story["parts"]] == ["charged"] * 4
        assert [p["words"] for p in story["parts"]] == [40, 40, 40, 40]
        assert milli(story["cost"]) == 1600
        # One progress event per part, in order, each with its cost.
        chapters = [(e["part"], milli(e["cost"])) for e in progress()]
        assert chapters == [(0, 400), (1, 400), (2, 400), (3, 400)]
        # Chapters 1 and 2 were generated and charged once; chapter 3 ran twice, charged once.
        assert len(gen.fake.seen("Write Chapter 1 of 3")) == 1
        assert len(gen.fake.seen("Write Chapter 2 of 3")) == 1
        assert len(gen.fake.seen("Write Chapter 3 of 3")) == 2
        journal = gen.journal(user)
        captures = [t for t in journal if t["kind"] == "capture"]
        assert len(captures) == 4 and len({t["hold_id"] for t in captures}) == 4
        balance = gen.balance(user)
        assert milli(balance["available"]) == 20_000 - 1600 and milli(balance["held"]) == 0

    async def test_story_beyond_the_balance_is_402_before_any_provider_call(self, gen: Env) -> None:
        user = gen.funded_user(1)
        marker = uuid.uuid4().hex
        async with httpx.AsyncClient(
            base_url=gen.gateway,
            headers={"Authorization": f"Bearer {gen.user_token(user)}"},
            timeout=30,
        ) as c:
            r = await c.post(
                "/v1/generation/story",
                json={
                    "premise": marker,
                    "chapters": 3,
                    "words_per_chapter": 50,
                    "model": "fake-small",
                },
            )
        assert r.status_code == 402, r.text
        assert gen.fake.seen(marker) == []
        balance = gen.balance(user)
        assert milli(balance["available"]) == 1000 and milli(balance["held"]) == 0
