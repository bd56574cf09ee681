"""`POST /v1/generation/text` through the gateway, against real processes and a fake
provider: exact charges in the ledger's journal, failures and timeouts free, fallback
at the serving model's price, streams charged for what was delivered, 402 before any
provider call, bad input refused before any hold."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from services.kit.runner import Suite, free_port
from services.kit.testing.plugin import principal_headers
from tests.generation.conftest import Env

pytestmark = pytest.mark.e2e

KU = 1000  # milli-Ku


def milli(ku: float | int) -> int:
    return round(ku * 1000)


def client(gen: Env, user_id: str, timeout: float = 30) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=gen.gateway,
        headers={"Authorization": f"Bearer {gen.user_token(user_id)}"},
        timeout=timeout,
    )


def kinds(journal: list[dict[str, object]]) -> list[str]:
    return [str(t["kind"]) for t in journal]


class TestCharges:
    async def test_exact_charge_and_journal(self, gen: Env) -> None:
        user = gen.funded_user(10)
        marker = uuid.uuid4().hex
        async with client(gen, user) as c:
            r = await c.post(
                "/v1/generation/text",
                json={
                    "prompt": f"Tell a tale {marker} #words=37",
                    "model": "fake-small",
                    "max_words": 200,
                },
            )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["words"] == 37
        assert body["text"].split() == [f"w{i}" for i in range(37)]
        assert (body["provider"], body["offline"], body["served_model"]) == (
            "fake",
            False,
            "fake-small",
        )
        # 37 words at ×1: 370 milli-Ku; the hold was 200 words = 2 Ku.
        assert milli(body["cost"]) == 370 and milli(body["held"]) == 2000
        assert milli(gen.balance(user)["available"]) == 10_000 - 370
        journal = gen.journal(user)
        assert kinds(journal)[0] == "grant"
        assert "reserve" in kinds(journal) and "capture" in kinds(journal)
        reserve = next(t for t in journal if t["kind"] == "reserve")
        capture = next(t for t in journal if t["kind"] == "capture")
        assert milli(reserve["amount"]) == 2000
        assert milli(capture["amount"]) == 370
        assert reserve["app"] == "penora" and capture["hold_id"] == reserve["hold_id"]
        assert len(gen.fake.seen(marker)) == 1

    async def test_provider_500_is_502_and_free(self, gen: Env) -> None:
        user = gen.funded_user(10)
        async with client(gen, user) as c:
            r = await c.post(
                "/v1/generation/text", json={"prompt": "anything", "model": "fake-500"}
            )
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == "provider_error"
        balance = gen.balance(user)
        assert milli(balance["available"]) == 10_000 and milli(balance["held"]) == 0
        assert "capture" not in kinds(gen.journal(user))
        assert "release" in kinds(gen.journal(user))

    async def test_stall_times_out_and_is_free(self, gen: Env) -> None:
        user = gen.funded_user(10)
        async with client(gen, user) as c:
            r = await c.post(
                "/v1/generation/text", json={"prompt": "anything", "model": "fake-stall"}
            )
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "provider_timeout"
        balance = gen.balance(user)
        assert milli(balance["available"]) == 10_000 and milli(balance["held"]) == 0

    async def test_retry_on_429_then_answers(self, gen: Env) -> None:
        user = gen.funded_user(10)
        marker = uuid.uuid4().hex
        gen.fake.fail_next(429, 1)
        async with client(gen, user) as c:
            r = await c.post(
                "/v1/generation/text",
                json={"prompt": f"{marker} #words=10", "model": "fake-small"},
            )
        assert r.status_code == 200, r.text
        assert r.json()["words"] == 10 and milli(r.json()["cost"]) == 100
        assert len(gen.fake.seen(marker)) == 2  # the 429, then the answer

    async def test_fallback_is_charged_at_the_second_models_price(self, gen: Env) -> None:
        user = gen.funded_user(10)
        marker = uuid.uuid4().hex
        async with client(gen, user) as c:
            r = await c.post(
                "/v1/generation/text",
                json={"prompt": f"{marker} #words=20", "model": "fake-broken", "max_words": 100},
            )
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["model"], body["served_model"], body["provider"]) == (
            "fake-broken",
            "fake-pricey",
            "fake-b",
        )
        # 20 words at ×1.5 = 300 milli-Ku; the hold covered the dearer model (100 × 15).
        assert milli(body["cost"]) == 300 and milli(body["held"]) == 1500
        assert milli(gen.balance(user)["available"]) == 10_000 - 300
        paths = [r["path"] for r in gen.fake.seen(marker)]
        assert paths[-1] == "/b/v1/chat/completions" and paths.count("/v1/chat/completions") == 2

    async def test_output_is_cut_at_max_words(self, gen: Env) -> None:
        user = gen.funded_user(10)
        async with client(gen, user) as c:
            r = await c.post(
                "/v1/generation/text",
                json={"prompt": "#words=80", "model": "fake-small", "max_words": 25},
            )
        body = r.json()
        assert body["words"] == 25 and body["finish_reason"] == "length"
        assert milli(body["cost"]) == 250

    async def test_client_gone_before_a_non_streamed_answer_pays_nothing(self, gen: Env) -> None:
        # Straight to the service: the gateway only notices a non-streamed client leaving
        # when its own upstream timeout closes the connection; the service then must not
        # charge (what this shows, without waiting that long).
        user = gen.funded_user(10)
        marker = uuid.uuid4().hex
        headers = principal_headers("user", app=None, user_id=user, scopes=("generate",))
        # 40 words, 100 ms apart: slow, never stalled; the client gives up after 1 s.
        async with httpx.AsyncClient(
            base_url=gen.suite.urls["generation"], headers=headers, timeout=1.0
        ) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.post(
                    "/v1/generation/text",
                    json={"prompt": f"{marker} #words=40 #delay_ms=100", "model": "fake-small"},
                )
        for _ in range(100):
            balance = gen.balance(user)
            if milli(balance["held"]) == 0:
                break
            await asyncio.sleep(0.1)
        assert milli(balance["held"]) == 0 and milli(balance["available"]) == 10_000
        assert "capture" not in kinds(gen.journal(user))
        assert len(gen.fake.seen(marker)) == 1


class TestRefusals:
    async def test_402_before_any_provider_call(self, gen: Env) -> None:
        user = gen.funded_user(1)  # 1 Ku: 100 words at ×1
        marker = uuid.uuid4().hex
        async with client(gen, user) as c:
            r = await c.post(
                "/v1/generation/text",
                json={"prompt": f"{marker}", "model": "fake-small", "max_words": 101},
            )
        assert r.status_code == 402, r.text
        assert r.json()["error"]["code"] == "insufficient_credits"
        assert gen.fake.seen(marker) == []
        assert kinds(gen.journal(user)) == ["grant"]

    @pytest.mark.parametrize(
        ("payload", "status"),
        [
            ({"prompt": "   "}, 422),
            ({"prompt": ""}, 422),
            ({"prompt": "x", "model": "no-such-model"}, 404),
            ({"prompt": "x", "max_words": 0}, 422),
            ({"prompt": "x", "max_words": 10**9}, 422),
            ({"prompt": "x", "model": "fake-short", "max_words": 101}, 422),
            ({"prompt": "x", "temperature": 2.5}, 422),
            ({"prompt": "x", "temperature": -1}, 422),
            ({"prompt": "x" * 20_001}, 422),
            ({"prompt": "x", "surprise": 1}, 422),
        ],
    )
    async def test_bad_input_is_4xx_with_no_hold(
        self, gen: Env, payload: dict[str, object], status: int
    ) -> None:
        user = gen.funded_user(10)
        async with client(gen, user) as c:
            r = await c.post("/v1/generation/text", json={"model": "fake-small", **payload})
        assert r.status_code == status, r.text
        assert "error" in r.json()
        assert kinds(gen.journal(user)) == ["grant"]

    async def test_unknown_tool_is_404_with_no_hold(self, gen: Env) -> None:
        user = gen.funded_user(10)
        async with client(gen, user) as c:
            r = await c.post("/v1/generation/tools/summon", json={"text": "x"})
        assert r.status_code in (404, 422), r.text
        assert kinds(gen.journal(user)) == ["grant"]

    async def test_a_token_without_generate_scope_is_refused(self, gen: Env) -> None:
        user = gen.funded_user(10)
        token = gen.user_token(user, scope="ledger:read")
        async with httpx.AsyncClient(base_url=gen.gateway) as c:
            r = await c.post(
                "/v1/generation/text",
                json={"prompt": "x", "model": "fake-small"},
                headers={"Authorization": f"Bearer {token}"},
            )
        assert r.status_code == 403, r.text
        assert kinds(gen.journal(user)) == ["grant"]


async def read_sse(response: httpx.Response) -> AsyncIterator[tuple[str | None, Any]]:
    event = None
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            yield event, orjson.loads(line[6:])


class TestStreaming:
    async def test_stream_to_the_end_is_charged_for_every_word(self, gen: Env) -> None:
        user = gen.funded_user(10)
        events: list[tuple[str | None, dict[str, object]]] = []
        async with client(gen, user) as c:
            async with c.stream(
                "POST",
                "/v1/generation/text",
                json={"prompt": "#words=30", "model": "fake-small", "stream": True},
            ) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                async for item in read_sse(r):
                    events.append(item)
        deltas = "".join(str(d["text"]) for e, d in events if e == "delta")
        assert deltas.split() == [f"w{i}" for i in range(30)]
        done = next(d for e, d in events if e == "done")
        assert done["words"] == 30 and milli(done["cost"]) == 300  # type: ignore[arg-type]
        assert milli(gen.balance(user)["available"]) == 10_000 - 300

    async def test_client_cut_after_n_words_pays_n_words(self, gen: Env) -> None:
        user = gen.funded_user(10)
        read = 0
        async with client(gen, user) as c:
            async with c.stream(
                "POST",
                "/v1/generation/text",
                json={
                    "prompt": "#words=200 #stall_after=12",
                    "model": "fake-small",
                    "max_words": 200,
                    "stream": True,
                },
            ) as r:
                assert r.status_code == 200
                async for event, data in read_sse(r):
                    if event == "delta":
                        read += len(str(data["text"]).split())
                    if read == 12:
                        break  # the client leaves; the provider is still "writing"
        assert read == 12
        # The settlement runs in the service once it sees the client gone.
        for _ in range(100):
            balance = gen.balance(user)
            if milli(balance["held"]) == 0:
                break
            await asyncio.sleep(0.1)
        assert milli(balance["held"]) == 0
        assert milli(balance["available"]) == 10_000 - 120
        capture = next(t for t in gen.journal(user) if t["kind"] == "capture")
        assert milli(capture["amount"]) == 120

    async def test_provider_cutting_the_stream_charges_the_words_delivered(self, gen: Env) -> None:
        user = gen.funded_user(10)
        events: list[tuple[str | None, Any]] = []
        async with client(gen, user) as c:
            async with c.stream(
                "POST",
                "/v1/generation/text",
                json={"prompt": "#words=50 #cut_after=7", "model": "fake-small", "stream": True},
            ) as r:
                assert r.status_code == 200
                async for item in read_sse(r):
                    events.append(item)
        text = "".join(str(d["text"]) for e, d in events if e == "delta")
        assert text.split() == [f"w{i}" for i in range(7)]
        done = next(d for e, d in events if e == "done")
        assert done["status"] == "partial" and done["words"] == 7
        assert milli(done["cost"]) == 70
        assert milli(gen.balance(user)["available"]) == 10_000 - 70

    async def test_provider_cut_without_streaming_is_502_and_free(self, gen: Env) -> None:
        # The client gets nothing unless the whole answer arrives: it pays nothing.
        user = gen.funded_user(10)
        async with client(gen, user) as c:
            r = await c.post(
                "/v1/generation/text",
                json={"prompt": "#words=50 #cut_after=7", "model": "fake-small"},
            )
        assert r.status_code == 502, r.text
        balance = gen.balance(user)
        assert milli(balance["available"]) == 10_000 and milli(balance["held"]) == 0

    async def test_stream_failing_before_any_word_is_502_and_free(self, gen: Env) -> None:
        user = gen.funded_user(10)
        async with client(gen, user) as c:
            r = await c.post(
                "/v1/generation/text",
                json={"prompt": "x", "model": "fake-500", "stream": True},
            )
        assert r.status_code == 502, r.text
        assert milli(gen.balance(user)["available"]) == 10_000


class TestSlowAnswers:
    def gateway(self, gen: Env, upstream: float, generation: float) -> Suite:
        """A second gateway on the same services, with these read timeouts."""
        env = {
            **gen.suite.env,
            "KU_GATEWAY_PORT": str(free_port()),
            "KU_GATEWAY_METRICS_PORT": str(free_port()),
            "KU_GATEWAY_UPSTREAM_TIMEOUT_SECONDS": str(upstream),
            "KU_GATEWAY_GENERATION_TIMEOUT_SECONDS": str(generation),
        }
        return Suite(env, only=["gateway"], migrate=False, quiet=True, ready_timeout=60)

    async def slow_generation(self, gen: Env, gateway: str, user: str) -> httpx.Response:
        # Not streamed: nothing is written until the 15th word, >= 1.5 s in.
        async with httpx.AsyncClient(
            base_url=gateway,
            headers={"Authorization": f"Bearer {gen.user_token(user)}"},
            timeout=30,
        ) as c:
            return await c.post(
                "/v1/generation/text",
                json={"prompt": "#words=15 #delay_ms=100", "model": "fake-small"},
            )

    async def test_generation_reads_have_their_own_timeout(self, gen: Env) -> None:
        # Longer than every other service's read timeout: still answered.
        user = gen.funded_user(10)
        with self.gateway(gen, upstream=1, generation=30) as gw:
            r = await self.slow_generation(gen, gw.urls["gateway"], user)
        assert r.status_code == 200, r.text
        assert r.json()["words"] == 15 and milli(r.json()["cost"]) == 150
        # And it is that timeout that governs them: shorter than the answer, 504, and
        # the user pays nothing (the service sees its client leave and releases).
        other = gen.funded_user(10)
        with self.gateway(gen, upstream=30, generation=1) as gw:
            r = await self.slow_generation(gen, gw.urls["gateway"], other)
            assert r.status_code == 504, r.text
            for _ in range(100):
                balance = gen.balance(other)
                if milli(balance["held"]) == 0:
                    break
                await asyncio.sleep(0.1)
        assert milli(balance["available"]) == 10_000 and milli(balance["held"]) == 0
