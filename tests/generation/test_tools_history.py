"""Writing tools with their own templates, saving to the workspace (a full one is
reported, the generation still paid), history with per-user isolation, app keys acting
for their users, and the Prometheus metrics per model and provider."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from services.kit.testing.plugin import principal_headers
from tests.generation.conftest import Env

pytestmark = pytest.mark.e2e


def milli(ku: float | int) -> int:
    return round(ku * 1000)


def as_user(gen: Env, user: str, scope: str = "generate ledger:read") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=gen.gateway,
        headers={"Authorization": f"Bearer {gen.user_token(user, scope=scope)}"},
        timeout=30,
    )


class TestTools:
    @pytest.mark.parametrize(
        ("tool", "inputs", "expect"),
        [
            ("complete", {"text": "The door creaked"}, "Continue this text"),
            ("rewrite", {"text": "It was dark.", "instructions": "gothic"}, "Rewrite the passage"),
            ("describe", {"subject": "a rainy market"}, "rich description of a rainy market"),
            ("brainstorm", {"topic": "heist twists", "count": 5}, "Brainstorm 5 distinct"),
        ],
    )
    async def test_each_tool_uses_its_template_and_is_charged(
        self, gen: Env, tool: str, inputs: dict[str, Any], expect: str
    ) -> None:
        user = gen.funded_user(10)
        marker = uuid.uuid4().hex
        inputs = {
            k: (f"{v} {marker} #words=15" if k in ("text", "subject", "topic") else v)
            for k, v in inputs.items()
        }
        async with as_user(gen, user) as c:
            r = await c.post(
                f"/v1/generation/tools/{tool}",
                json={"model": "fake-small", "max_words": 50, **inputs},
            )
        assert r.status_code == 200, r.text
        assert r.json()["words"] == 15 and milli(r.json()["cost"]) == 150
        (request,) = gen.fake.seen(marker)
        prompt = request["messages"][-1]["content"]
        assert expect in prompt
        assert request["messages"][0]["role"] == "system"

    async def test_missing_tool_input_is_422_with_no_hold(self, gen: Env) -> None:
        user = gen.funded_user(10)
        async with as_user(gen, user) as c:
            r = await c.post("/v1/generation/tools/describe", json={"text": "not a subject"})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "missing_tool_input"
        assert [t["kind"] for t in gen.journal(user)] == ["grant"]


class TestSave:
    async def test_saved_to_the_workspace(self, gen: Env) -> None:
        user = gen.funded_user(10)
        async with as_user(gen, user, "generate workspace:read") as c:
            r = await c.post(
                "/v1/generation/text",
                json={
                    "prompt": "#words=12",
                    "model": "fake-small",
                    "save": True,
                    "title": "Twelve words",
                },
            )
            assert r.status_code == 200, r.text
            code = r.json()["project_code"]
            assert code and r.json()["save_error"] is None
            project = await c.get(f"/v1/workspace/projects/{code}")
        assert project.status_code == 200, project.text
        body = project.json()
        assert body["title"] == "Twelve words" and body["app_source"] == "penora"
        assert body["content"] == r.json()["text"]
        assert body["metadata"]["generation_id"] == r.json()["id"]

    async def test_full_workspace_is_reported_and_the_text_still_returned(self, gen: Env) -> None:
        user = gen.funded_user(10)
        r = gen.call(
            "PUT",
            f"{gen.suite.urls['workspace']}/v1/workspace/quotas/{user}",
            json={"limit_bytes": 10},
            headers=principal_headers("app", audience="workspace", app="ops", scopes=("admin",)),
        )
        assert r.status_code == 200, r.text
        async with as_user(gen, user) as c:
            r = await c.post(
                "/v1/generation/text",
                json={"prompt": "#words=12", "model": "fake-small", "save": True},
            )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["project_code"] is None
        assert body["save_error"]["code"] == "storage_limit_exceeded"
        assert body["words"] == 12 and milli(body["cost"]) == 120
        assert milli(gen.balance(user)["available"]) == 10_000 - 120


class TestHistory:
    async def test_own_history_only(self, gen: Env) -> None:
        alice, bob = gen.funded_user(10), gen.funded_user(10)
        async with as_user(gen, alice) as a, as_user(gen, bob) as b:
            r = await a.post(
                "/v1/generation/text", json={"prompt": "alice #words=5", "model": "fake-small"}
            )
            alice_gen = r.json()["id"]
            await b.post(
                "/v1/generation/text", json={"prompt": "bob #words=6", "model": "fake-small"}
            )
            mine = (await a.get("/v1/generation/history")).json()["items"]
            assert [g["id"] for g in mine] == [alice_gen]
            assert mine[0]["words"] == 5 and milli(mine[0]["cost"]) == 50
            assert (mine[0]["provider"], mine[0]["status"]) == ("fake", "completed")
            # Bob cannot list or read Alice's generations.
            r = await b.get("/v1/generation/history", params={"user_id": alice})
            assert r.status_code == 403
            r = await b.get(f"/v1/generation/generations/{alice_gen}")
            assert r.status_code == 404
            r = await a.get(f"/v1/generation/generations/{alice_gen}")
            assert r.status_code == 200 and r.json()["output"].split()[0] == "w0"

    async def test_history_pages(self, gen: Env) -> None:
        user = gen.funded_user(10)
        async with as_user(gen, user) as c:
            for i in range(3):
                r = await c.post(
                    "/v1/generation/text", json={"prompt": f"#words={i + 1}", "model": "fake-small"}
                )
                assert r.status_code == 200
            first = (await c.get("/v1/generation/history", params={"limit": 2})).json()
            second = (
                await c.get(
                    "/v1/generation/history", params={"limit": 2, "cursor": first["next_cursor"]}
                )
            ).json()
        words = [g["words"] for g in first["items"] + second["items"]]
        assert words == [3, 2, 1] and second["next_cursor"] is None


class TestAppKeys:
    async def test_app_key_generates_for_a_user_it_names(self, gen: Env) -> None:
        key = gen.new_key("imagegene", "generate")
        user = gen.funded_user(10)
        async with httpx.AsyncClient(
            base_url=gen.gateway, headers={"X-API-Key": key}, timeout=30
        ) as c:
            r = await c.post(
                "/v1/generation/text", json={"prompt": "#words=8", "model": "fake-small"}
            )
            assert r.status_code == 422 and r.json()["error"]["code"] == "user_id_required"
            r = await c.post(
                "/v1/generation/text",
                json={"user_id": user, "prompt": "#words=8", "model": "fake-small"},
            )
            assert r.status_code == 200, r.text
        capture = next(t for t in gen.journal(user) if t["kind"] == "capture")
        assert capture["app"] == "imagegene" and milli(capture["amount"]) == 80

    async def test_key_without_generate_scope_is_refused(self, gen: Env) -> None:
        key = gen.new_key("penora", "ledger:read")
        user = gen.funded_user(10)
        r = gen.call(
            "POST",
            f"{gen.gateway}/v1/generation/text",
            json={"user_id": user, "prompt": "x", "model": "fake-small"},
            headers={"X-API-Key": key},
        )
        assert r.status_code == 403
        assert [t["kind"] for t in gen.journal(user)] == ["grant"]


class TestCatalogAndMetrics:
    def test_the_gateway_merges_the_generation_openapi(self, gen: Env) -> None:
        doc = gen.call("GET", f"{gen.gateway}/openapi.json").json()
        for path in (
            "/v1/generation/text",
            "/v1/generation/story",
            "/v1/generation/chat/completions",
            "/v1/generation/models",
            "/v1/generation/estimate",
            "/v1/generation/history",
        ):
            assert path in doc["paths"], path

    async def test_models_estimate_and_metrics(self, gen: Env) -> None:
        user = gen.funded_user(10)
        async with as_user(gen, user) as c:
            models = (await c.get("/v1/generation/models")).json()
            assert models["object"] == "list"
            pricey = next(m for m in models["data"] if m["id"] == "fake-pricey")
            assert pricey["multiplier"] == 1.5 and pricey["price_per_100_words"] == 1.5
            assert pricey["offline"] is False
            r = await c.post(
                "/v1/generation/estimate", json={"model": "fake-broken", "max_words": 333}
            )
            assert r.status_code == 200, r.text
            # 333 words: 3.33 Ku at ×1; the hold covers its ×1.5 fallback: 4.995 Ku.
            assert milli(r.json()["cost"]) == 3330 and milli(r.json()["max_cost"]) == 4995
            r = await c.post("/v1/generation/estimate", json={"model": "nope", "max_words": 10})
            assert r.status_code == 404
            await c.post("/v1/generation/text", json={"prompt": "#words=4", "model": "fake-small"})
        metrics = gen.call("GET", f"{gen.suite.urls['generation']}/metrics").text
        line = next(
            ln
            for ln in metrics.splitlines()
            if ln.startswith("ku_generation_requests_total{")
            and 'model="fake-small"' in ln
            and 'provider="fake"' in ln
            and 'status="completed"' in ln
        )
        assert float(line.rsplit(" ", 1)[1]) >= 1
        assert "ku_generation_first_token_seconds_bucket" in metrics
