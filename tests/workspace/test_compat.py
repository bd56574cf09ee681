"""The old clients' workspace routes (gateway/compat/workspace.py) over the real
workspace service: the gateway's upstream client is pointed at the workspace app
in-process, and the gateway's authentication is replaced by a fixed principal."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, get_args

import httpx
import pytest
from fastapi import FastAPI

from services.kit.principal import PRINCIPAL_HEADER, Principal, outgoing_header
from tests.workspace.helpers import b64, png

compat = pytest.importorskip("gateway.compat")
unified = pytest.importorskip("gateway.compat.unified")
from gateway.upstream import SignedPrincipal, Upstreams  # noqa: E402

MB = 1024 * 1024


class InProcessUpstreams(Upstreams):
    def __init__(self, clients: dict[str, httpx.AsyncClient]) -> None:
        self.clients = clients

    async def call(
        self,
        service,
        method,
        path,
        *,
        principal,
        json=None,
        params=None,
        headers=None,
        **_: Any,
    ) -> tuple[int, Any]:
        out = dict(headers or {})
        p = principal.principal if isinstance(principal, SignedPrincipal) else principal
        out[PRINCIPAL_HEADER] = outgoing_header(p, audience=service)
        r = await self.clients[service].request(method, path, json=json, params=params, headers=out)
        return r.status_code, (r.json() if r.content else None)


@pytest.fixture(scope="session")
def caller_box() -> dict[str, Principal]:
    return {
        "principal": Principal(
            kind="app",
            app="imagegene",
            scopes=frozenset({"workspace:read", "workspace:write", "users:any"}),
        )
    }


@pytest.fixture(scope="session")
async def old_client(workspace, caller_box):
    app = FastAPI()
    app.state.gateway = SimpleNamespace(upstreams=InProcessUpstreams({"workspace": workspace}))
    app.include_router(compat.build_router())
    dependency = get_args(unified.Caller)[1].dependency
    app.dependency_overrides[dependency] = lambda: SignedPrincipal(caller_box["principal"])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway"
    ) as client:
        yield client


@pytest.fixture
def as_user(caller_box):
    saved = caller_box["principal"]

    def switch(user_id: str) -> None:
        caller_box["principal"] = Principal(
            kind="user",
            app="penora",
            user_id=user_id,
            scopes=frozenset({"workspace:read", "workspace:write"}),
        )

    yield switch
    caller_box["principal"] = saved


async def save(client, user_id, **fields):
    body = {
        "user_id": user_id,
        "app_source": "penora",
        "project_type": "story",
        "title": "T",
        "content": "words",
        **fields,
    }
    return await client.post("/api/unified/save-project", json=body)


class TestSeedFlow:
    async def test_save_list_and_storage_stats_for_both_apps(self, old_client, new_user_id):
        uid = new_user_id()
        text = "x" * 100_000
        r = await save(old_client, int(uid), title="My story", content=text)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["success"] is True and len(body["project_code"]) == 6
        assert body["title"] == "My story" and body["app_source"] == "penora"
        assert body["size_mb"] == round((100_000 + 8) / MB, 4)
        image = png(50, 50, noise=True)
        r = await save(
            old_client,
            uid,
            app_source="imagegene",
            project_type="ai_art",
            title="Art",
            content=b64(image),
            metadata={"style": "photo"},
        )
        assert r.status_code == 200 and r.json()["content_type"] == "image/png"
        img_size = len(image) + 3 + len('{"style":"photo"}')

        r = await old_client.get("/api/unified/projects", params={"user_id": uid})
        listed = r.json()
        assert listed["success"] and listed["total_count"] == 2
        assert listed["penora_count"] == 1 and listed["imagegene_count"] == 1
        assert [p["title"] for p in listed["all_projects"]] == ["Art", "My story"]
        assert listed["imagegene_projects"][0]["size_mb"] == round(img_size / MB, 4)
        used = 100_008 + img_size
        assert listed["storage_stats"]["used_mb"] == round(used / MB, 2)
        assert listed["storage_stats"]["limit_mb"] == 1.0

        r = await old_client.get(
            "/api/unified/projects", params={"user_id": uid, "app": "imagegene"}
        )
        assert [p["title"] for p in r.json()["all_projects"]] == ["Art"]

        r = await old_client.get("/api/unified/storage-stats", params={"user_id": uid})
        stats = r.json()
        assert stats["storage_stats"]["used_mb"] == round(used / MB, 2)
        assert stats["storage_stats"]["available_mb"] == round((MB - used) / MB, 2)
        assert stats["storage_stats"]["usage_percentage"] == round(used * 100 / MB, 2)
        assert stats["breakdown"]["penora_mb"] == round(100_008 / MB, 2)
        assert stats["breakdown"]["imagegene_mb"] == round(img_size / MB, 2)
        assert stats["breakdown"]["total_projects"] == 2
        assert stats["breakdown"]["penora_projects"] == 1

    async def test_storage_full_is_413_in_the_seed_shape(self, old_client, new_user_id):
        uid = new_user_id()
        assert (await save(old_client, uid, content="a" * 600_000)).status_code == 200
        r = await save(old_client, uid, content="b" * 500_000)
        assert r.status_code == 413
        body = r.json()
        assert body["success"] is False and body["error"] == "Storage limit exceeded"
        assert body["details"].startswith("Adding 0.48MB would exceed 1MB limit")

    async def test_older_penora_routes(self, old_client, new_user_id):
        uid = new_user_id()
        code = (await save(old_client, uid, title="Old route", content="hello")).json()[
            "project_code"
        ]
        r = await old_client.get("/api/user-projects", params={"user_id": uid})
        assert r.status_code == 200 and [p["code"] for p in r.json()["projects"]] == [code]
        r = await old_client.get(f"/api/project/{code}", params={"user_id": uid})
        assert r.status_code == 200 and r.json()["project"]["content"] == "hello"
        r = await old_client.get("/api/project/ZZZZZZ")
        assert r.status_code == 404 and r.json()["success"] is False
        r = await old_client.get("/api/project/..%2Fstorage")
        assert r.status_code == 404


class TestErrors:
    async def test_bad_input_and_other_users_in_seed_shape(self, old_client, new_user_id, as_user):
        uid = new_user_id()
        r = await save(old_client, uid, content="data:image/png;base64,@@")
        assert r.status_code == 422 and r.json()["success"] is False
        r = await old_client.post("/api/unified/save-project", json={"content": "x"})
        assert r.status_code == 422 and r.json()["error"] == "User ID required"
        as_user(new_user_id())
        r = await old_client.get("/api/unified/projects", params={"user_id": uid})
        assert r.status_code == 403 and r.json()["success"] is False
        r = await save(old_client, uid)
        assert r.status_code == 403
