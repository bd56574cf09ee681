"""Pricing, word counting and cutting, SSE parsing, the provider router (retries,
fallback, breaker) against the fake provider and real Redis, the offline provider,
and the production startup check."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from services.generation.catalog import Catalog, count_words, first_words, price_milli
from services.generation.config import GenerationSettings
from services.generation.providers import (
    Offline,
    Router,
    Served,
    SSEParser,
    build_providers,
    check_production,
)
from services.generation.service import _Cutter
from services.kit.errors import ServiceUnavailable, UpstreamError, UpstreamTimeout
from tests.generation.conftest import MODELS, generation_env
from tests.generation.fake_provider import FakeProvider


class TestPricing:
    @pytest.mark.parametrize(
        ("words", "multiplier", "milli"),
        [
            (0, 1000, 0),
            (1, 1000, 10),
            (100, 1000, 1000),
            (1, 1500, 15),
            (7, 1333, 94),
            (100, 2000, 2000),
            (3, 1001, 31),
        ],
    )
    def test_price(self, words: int, multiplier: int, milli: int) -> None:
        assert price_milli(words, multiplier) == milli

    @given(st.integers(0, 100_000), st.integers(1, 10_000))
    def test_price_is_the_exact_ceiling(self, words: int, multiplier: int) -> None:
        milli = price_milli(words, multiplier)
        assert milli * 100 >= words * multiplier > (milli - 1) * 100 or words == 0

    def test_count_words(self) -> None:
        assert count_words("  one two\nthree\t four  ") == 4
        assert count_words("") == 0
        assert first_words("a b c d", 2) == "a b"
        assert first_words(" a  b c", 2) == " a  b"


class TestCutter:
    @given(
        st.lists(st.text(alphabet="ab \n", max_size=8), max_size=40),
        st.integers(1, 30),
    )
    def test_cut_text_is_the_first_words(self, deltas: list[str], limit: int) -> None:
        cutter = _Cutter(limit)
        out = ""
        for delta in deltas:
            out += cutter.take(delta)
            if cutter.full:
                break
        whole = "".join(deltas)
        expected = first_words(whole, limit)
        assert out.split() == expected.split()
        assert cutter.words == count_words(out)


class TestSSE:
    STREAM = b': ping\ndata: {"a":\ndata: 1}\n\nevent: x\nid: 3\ndata:  two spaces\n\ndata: [DONE]'

    def parse(self, pieces: list[bytes]) -> list[bytes]:
        parser = SSEParser()
        out = [event for piece in pieces for event in parser.feed(piece)]
        return out + parser.end()

    def test_data_lines_joined_and_comments_and_fields_skipped(self) -> None:
        assert self.parse([self.STREAM]) == [b'{"a":\n1}', b" two spaces", b"[DONE]"]

    @pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
    def test_any_split_of_the_bytes_and_any_line_end_parse_the_same(self, newline: bytes) -> None:
        # A provider's events arrive cut anywhere by the network, CRLF halves included.
        stream = self.STREAM.replace(b"\n", newline)
        expected = [b'{"a":\n1}', b" two spaces", b"[DONE]"]
        for cut in range(len(stream) + 1):
            assert self.parse([stream[:cut], stream[cut:]]) == expected, cut
        assert self.parse([bytes([b]) for b in stream]) == expected

    def test_nothing_pending_at_the_end(self) -> None:
        parser = SSEParser()
        assert parser.feed(b"data: 1\n\n") == [b"1"]
        assert parser.end() == []


def settings_for(fake: FakeProvider, **overrides: str) -> GenerationSettings:
    env = {**generation_env(fake), "KU_GENERATION_RETRIES": "2", **overrides}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return GenerationSettings()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(os.environ["KU_REDIS_URL"])
    yield client
    await client.aclose()


async def collect(router: Router, model_id: str, prompt: str) -> tuple[str, list[Served]]:
    served: list[Served] = []
    text = ""
    async for delta in router.stream(
        router.catalog.get(model_id),
        [{"role": "user", "content": prompt}],
        max_words=100,
        temperature=0.5,
        served=served,
    ):
        text += delta
    return text, served


class TestRouter:
    def router(self, fake: FakeProvider, redis: Redis, **overrides: str) -> Router:
        settings = settings_for(fake, KU_BUS_PREFIX=f"unit{uuid.uuid4().hex[:8]}", **overrides)
        catalog = Catalog(MODELS, default_provider="fake", offline=False)
        return Router(settings, catalog, build_providers(settings), redis)

    async def test_retries_5xx_then_answers(self, fake: FakeProvider, redis: Redis) -> None:
        router = self.router(fake, redis)
        marker = uuid.uuid4().hex
        fake.fail_next(503, 2)
        text, served = await collect(router, "fake-small", f"{marker} #words=5")
        assert text.split() == ["w0", "w1", "w2", "w3", "w4"]
        assert served[0].provider == "fake" and not served[0].offline
        assert len(fake.seen(marker)) == 3
        assert fake.seen(marker)[-1]["authorization"] == "Bearer fake-key"
        await router.aclose()

    async def test_4xx_is_not_retried(self, fake: FakeProvider, redis: Redis) -> None:
        router = self.router(fake, redis)
        marker = uuid.uuid4().hex
        fake.fail_next(400, 1)
        with pytest.raises(UpstreamError):
            await collect(router, "fake-small", marker)
        assert len(fake.seen(marker)) == 1
        await router.aclose()

    async def test_stall_is_a_timeout(self, fake: FakeProvider, redis: Redis) -> None:
        router = self.router(fake, redis, KU_GENERATION_TIMEOUT_SECONDS="0.5")
        with pytest.raises(UpstreamTimeout):
            await collect(router, "fake-stall", "x")
        await router.aclose()

    async def test_cut_stream_after_text_is_an_error_not_a_retry(
        self, fake: FakeProvider, redis: Redis
    ) -> None:
        from services.generation.providers import ProviderError

        router = self.router(fake, redis)
        marker = uuid.uuid4().hex
        served: list[Served] = []
        got = ""
        with pytest.raises(ProviderError):
            async for delta in router.stream(
                router.catalog.get("fake-small"),
                [{"role": "user", "content": f"{marker} #words=20 #cut_after=6"}],
                max_words=100,
                temperature=0.5,
                served=served,
            ):
                got += delta
        assert got.split() == [f"w{i}" for i in range(6)]
        assert len(fake.seen(marker)) == 1  # never restarted: the words were delivered
        await router.aclose()

    async def test_open_breaker_skips_the_provider(self, fake: FakeProvider, redis: Redis) -> None:
        router = self.router(
            fake, redis, KU_GENERATION_BREAKER_FAILURES="2", KU_GENERATION_RETRIES="0"
        )
        for _ in range(2):
            with pytest.raises(UpstreamError):
                await collect(router, "fake-500", "x")
        assert (await router.breakers["fake"].state()).state == "open"
        marker = uuid.uuid4().hex
        with pytest.raises(ServiceUnavailable):
            await collect(router, "fake-small", marker)
        assert fake.seen(marker) == []  # refused without calling the failing provider
        # The other provider has its own breaker: the fallback model still answers.
        text, served = await collect(router, "fake-pricey", "#words=3")
        assert served[0].provider == "fake-b" and text.split() == ["w0", "w1", "w2"]
        await router.aclose()


class TestProviderSettings:
    def test_idle_seconds_per_provider(self) -> None:
        settings = GenerationSettings(
            generation_providers={
                "remote": {"base_url": "https://example.invalid/v1"},
                "local": {"base_url": "http://127.0.0.1:1/v1", "idle_seconds": 3},
            }
        )
        providers = build_providers(settings)
        assert providers["remote"].idle_seconds == 50.0  # type: ignore[attr-defined]
        assert providers["local"].idle_seconds == 3.0  # type: ignore[attr-defined]

    @pytest.mark.parametrize("bad", ["5", -1, 3601, True, None])
    def test_a_bad_idle_seconds_is_refused_naming_the_provider(self, bad: object) -> None:
        settings = GenerationSettings(
            generation_providers={
                "local": {"base_url": "http://127.0.0.1:1/v1", "idle_seconds": bad}
            }
        )
        with pytest.raises(ValueError, match="local's idle_seconds"):
            build_providers(settings)


class TestOffline:
    async def test_offline_output_is_marked(self) -> None:
        provider = Offline()
        text = "".join(
            [
                d
                async for d in provider.stream(
                    "m", [{"role": "user", "content": "hi"}], max_tokens=40, temperature=0.1
                )
            ]
        )
        assert count_words(text) > 0 and provider.offline is True

    def test_offline_catalog_routes_every_model_offline(self) -> None:
        catalog = Catalog([], default_provider="deepinfra", offline=True)
        assert {m.provider for m in catalog.models.values()} == {"offline"}
        assert "mistralai/Mistral-7B-Instruct-v0.3" in catalog.models


class TestProductionCheck:
    def check(self, **env: str) -> None:
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            settings = GenerationSettings()
            catalog = Catalog(
                settings.generation_models,
                default_provider=next(iter(settings.generation_providers)),
                offline=settings.generation_offline,
            )
            check_production(settings, catalog)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def test_offline_refused_in_production(self) -> None:
        with pytest.raises(RuntimeError, match="offline provider is for development"):
            self.check(KU_ENVIRONMENT="production", KU_GENERATION_OFFLINE="true")

    def test_missing_key_refused_in_production(self) -> None:
        with pytest.raises(RuntimeError, match="no API key"):
            self.check(KU_ENVIRONMENT="production", KU_GENERATION_API_KEY="")

    def test_real_provider_passes(self) -> None:
        self.check(KU_ENVIRONMENT="production", KU_GENERATION_API_KEY="k")
        self.check(KU_ENVIRONMENT="development", KU_GENERATION_OFFLINE="true")

    def test_the_process_refuses_to_start_and_says_why(self) -> None:
        env = {**os.environ, "KU_ENVIRONMENT": "production", "KU_GENERATION_OFFLINE": "true"}
        done = subprocess.run(
            [sys.executable, "-c", "from services.generation.app import create_app; create_app()"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0
        assert "KU_GENERATION_OFFLINE=true in production" in done.stderr


class TestHotRoutes:
    def test_text_and_chat_completions_are_answered_in_front_of_fastapi(self) -> None:
        from services.generation.app import create_app

        app = create_app()
        # The routes FrontApp answers itself (services/kit/front.py), by method and path.
        hot = set(app._exact)  # type: ignore[attr-defined]
        assert {
            ("POST", "/v1/generation/text"),
            ("POST", "/v1/generation/chat/completions"),
        } <= hot
