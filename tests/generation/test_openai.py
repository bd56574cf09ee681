"""The official `openai` package, unchanged, against Ku's OpenAI-compatible face through
the gateway: a completion, a streamed completion, and an abandoned stream, each
charged exactly for the words delivered; `models.list()` reads the catalog."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import openai
import pytest

from tests.generation.conftest import Env

pytestmark = pytest.mark.e2e


def milli(ku: float | int) -> int:
    return round(ku * 1000)


def kinds(gen: Env, user: str) -> list[str]:
    return [str(t["kind"]) for t in gen.journal(user)]


async def settled(gen: Env, user: str) -> dict[str, Any]:
    for _ in range(100):
        balance = gen.balance(user)
        if milli(balance["held"]) == 0:
            return balance
        await asyncio.sleep(0.1)
    raise AssertionError("hold not settled")


@pytest.fixture(scope="module")
def partner_key(gen: Env) -> str:
    return gen.new_key("quillpad", "generate")


class TestOpenAIClient:
    async def test_completion_with_a_user_token(self, gen: Env) -> None:
        user = gen.funded_user(10)
        client = openai.AsyncOpenAI(
            base_url=f"{gen.gateway}/v1/generation", api_key=gen.user_token(user)
        )
        async with client:
            done = await client.chat.completions.create(
                model="fake-small",
                messages=[
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Say something #words=23"},
                ],
            )
        assert done.choices[0].message.content is not None
        assert done.choices[0].message.content.split() == [f"w{i}" for i in range(23)]
        assert done.usage is not None and done.usage.completion_tokens == 23
        assert milli(gen.balance(user)["available"]) == 10_000 - 230
        assert kinds(gen, user).count("capture") == 1

    async def test_streamed_completion_with_an_app_key(self, gen: Env, partner_key: str) -> None:
        # No max_tokens: up to 1000 words, held at ×1.5 = 15 Ku.
        user = gen.funded_user(20)
        gen.link(user, "quillpad")  # a partner acts only for its linked users
        start = milli((await settled(gen, user))["available"])
        # Linking created the user in auth, whose welcome credits may land at any time.
        known = {t["id"] for t in gen.journal(user)}
        client = openai.AsyncOpenAI(base_url=f"{gen.gateway}/v1/generation", api_key=partner_key)
        async with client:
            stream = await client.chat.completions.create(
                model="fake-pricey",
                messages=[{"role": "user", "content": "Stream it #words=18"}],
                stream=True,
                user=user,  # OpenAI's `user` field names the Ku user who pays
            )
            text = ""
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
        assert text.split() == [f"w{i}" for i in range(18)]
        # 18 words at ×1.5 = 270 milli-Ku, booked in the partner's lane.
        balance = await settled(gen, user)
        granted_since = sum(
            milli(t["amount"])
            for t in gen.journal(user)
            if t["kind"] == "grant" and t["id"] not in known
        )
        assert milli(balance["available"]) == start - 270 + granted_since
        capture = next(t for t in gen.journal(user) if t["kind"] == "capture")
        assert milli(capture["amount"]) == 270 and capture["app"] == "quillpad"

    async def test_abandoned_stream_is_charged_for_what_was_read(self, gen: Env) -> None:
        user = gen.funded_user(10)
        client = openai.AsyncOpenAI(
            base_url=f"{gen.gateway}/v1/generation", api_key=gen.user_token(user)
        )
        read = 0
        async with client:
            stream = await client.chat.completions.create(
                model="fake-small",
                messages=[{"role": "user", "content": "Long one #words=300 #stall_after=9"}],
                max_tokens=300,
                stream=True,
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    read += len(chunk.choices[0].delta.content.split())
                if read == 9:
                    break
            await stream.close()
        assert read == 9
        balance = await settled(gen, user)
        assert milli(balance["available"]) == 10_000 - 90
        capture = next(t for t in gen.journal(user) if t["kind"] == "capture")
        assert milli(capture["amount"]) == 90

    async def test_models_list(self, gen: Env) -> None:
        user = gen.funded_user(1)
        client = openai.AsyncOpenAI(
            base_url=f"{gen.gateway}/v1/generation", api_key=gen.user_token(user)
        )
        async with client:
            models = [m.id async for m in client.models.list()]
        assert "fake-small" in models and "fake-pricey" in models

    async def test_402_and_provider_errors_arrive_as_openai_errors(self, gen: Env) -> None:
        user = gen.funded_user(1)
        marker = uuid.uuid4().hex
        client = openai.AsyncOpenAI(
            base_url=f"{gen.gateway}/v1/generation", api_key=gen.user_token(user), max_retries=0
        )
        async with client:
            with pytest.raises(openai.APIStatusError) as info:
                await client.chat.completions.create(
                    model="fake-small",
                    messages=[{"role": "user", "content": marker}],
                    max_tokens=500,
                )
            assert info.value.status_code == 402
            with pytest.raises(openai.InternalServerError) as failed:
                await client.chat.completions.create(
                    model="fake-500", messages=[{"role": "user", "content": "x"}], max_tokens=10
                )
            assert failed.value.status_code == 502
        assert gen.fake.seen(marker) == []
        assert milli(gen.balance(user)["available"]) == 1000
