from __future__ import annotations

import asyncio
import base64
import os
import time

from services.kit.outbox import decode_event, stream_name
from services.workspace.models import CODE_ALPHABET
from tests.workspace.helpers import (
    admin,
    app_key,
    b64,
    codes,
    data_url,
    key,
    png,
    save,
    saved,
    storage,
    user,
)


class TestCreate:
    async def test_text_project_is_stored_with_code_type_and_size(self, workspace, new_user_id):
        uid = new_user_id()
        body = await saved(
            workspace, uid, title="Lighthouse", content="The lamp — ünïcode.", metadata={"w": 3}
        )
        code = body["code"]
        assert len(code) == 6 and set(code) <= set(CODE_ALPHABET)
        assert body["content_type"] == "text/plain"
        expected = len("The lamp — ünïcode.".encode()) + len("Lighthouse") + len('{"w":3}')
        assert body["size_bytes"] == expected
        r = await workspace.get(f"/v1/workspace/projects/{code}", headers=app_key())
        assert r.status_code == 200
        got = r.json()
        assert got["content"] == "The lamp — ünïcode." and got["content_encoding"] == "text"
        assert got["metadata"] == {"w": 3} and got["user_id"] == uid
        assert got["app_source"] == "penora" and got["project_type"] == "story"

    async def test_metadata_with_an_integer_beyond_64_bits_is_refused(self, workspace, new_user_id):
        # Found by schemathesis (through the compat save-project): the encoder's 500.
        uid = new_user_id()
        r = await save(workspace, uid, metadata={"seed": 2**64})
        assert r.status_code == 422, r.text
        (error,) = r.json()["error"]["detail"]["errors"]
        assert error["type"] == "invalid_number" and error["loc"] == ["body", "metadata"]
        assert (await saved(workspace, uid, metadata={"seed": 2**63 - 1}))["code"]

    async def test_codes_are_case_insensitive_on_input(self, workspace, new_user_id):
        code = (await saved(workspace, new_user_id()))["code"]
        r = await workspace.get(f"/v1/workspace/projects/{code.lower()}", headers=app_key())
        assert r.status_code == 200 and r.json()["code"] == code

    async def test_markdown_is_detected(self, workspace, new_user_id):
        body = await saved(workspace, new_user_id(), content="# Chapter 1\n\nIt **was** dark.")
        assert body["content_type"] == "text/markdown"

    async def test_base64_image_is_decoded_and_its_real_size_counted(self, workspace, new_user_id):
        image = png(40, 30)
        body = await saved(
            workspace,
            new_user_id(),
            app_source="imagegene",
            project_type="ai_artwork",
            title="Art",
            content=b64(image),
        )
        assert body["content_type"] == "image/png"
        assert body["size_bytes"] == len(image) + len("Art")
        r = await workspace.get(f"/v1/workspace/projects/{body['code']}/content", headers=admin())
        assert r.status_code == 200
        assert r.headers["content-type"] == "image/png" and r.content == image

    async def test_data_url_image_is_decoded(self, workspace, new_user_id):
        import io

        from PIL import Image

        out = io.BytesIO()
        Image.new("RGB", (8, 8), (0, 0, 255)).save(out, format="JPEG")
        body = await saved(
            workspace, new_user_id(), title="J", content=data_url(out.getvalue(), "image/jpeg")
        )
        assert body["content_type"] == "image/jpeg" and body["project_type"] == "story"
        r = await workspace.get(f"/v1/workspace/projects/{body['code']}", headers=admin())
        assert base64.b64decode(r.json()["content"]) == out.getvalue()
        assert r.json()["content_encoding"] == "base64"

    async def test_text_content_download_is_utf8_text(self, workspace, new_user_id):
        body = await saved(workspace, new_user_id(), content="héllo")
        r = await workspace.get(f"/v1/workspace/projects/{body['code']}/content", headers=admin())
        assert r.headers["content-type"] == "text/plain; charset=utf-8"
        assert r.content == "héllo".encode()
        assert r.headers["x-content-type-options"] == "nosniff"

    async def test_user_token_saves_for_itself_without_naming_user(self, workspace, new_user_id):
        uid = new_user_id()
        r = await workspace.post(
            "/v1/workspace/projects", json={"title": "Mine", "content": "x"}, headers=user(uid)
        )
        assert r.status_code == 201, r.text
        assert r.json()["user_id"] == uid and r.json()["app_source"] == "penora"
        assert r.json()["project_type"] == "text"

    async def test_save_emits_project_saved_and_delete_emits_project_deleted(
        self, workspace, workspace_app, new_user_id
    ):
        code = (await saved(workspace, new_user_id()))["code"]
        r = await workspace.delete(f"/v1/workspace/projects/{code}", headers=app_key())
        assert r.status_code == 200
        redis = workspace_app.state.redis
        stream = stream_name(os.environ["KU_BUS_PREFIX"], "workspace")
        deadline = time.monotonic() + 5
        topics: set[str] = set()
        while time.monotonic() < deadline and topics != {"project.saved", "project.deleted"}:
            entries = await redis.xrange(stream)
            topics = {
                e["topic"] for _, f in entries if (e := decode_event(f))["payload"]["code"] == code
            }
            await asyncio.sleep(0.05)
        assert topics == {"project.saved", "project.deleted"}


class TestIdempotency:
    async def test_replay_returns_the_first_result_and_stores_once(self, workspace, new_user_id):
        uid = new_user_id()
        headers = {**app_key(), **key()}
        body = {"user_id": uid, "app_source": "penora", "title": "Once", "content": "only once"}
        first = await workspace.post("/v1/workspace/projects", json=body, headers=headers)
        second = await workspace.post("/v1/workspace/projects", json=body, headers=headers)
        assert first.status_code == second.status_code == 201
        assert second.headers.get("idempotent-replayed") == "true"
        assert first.json()["code"] == second.json()["code"]
        assert await codes(workspace, uid) == [first.json()["code"]]

    async def test_concurrent_duplicates_have_one_effect(self, workspace, new_user_id):
        uid = new_user_id()
        k = key()
        body = {"user_id": uid, "app_source": "penora", "title": "Dup", "content": "x" * 1000}
        results = await asyncio.gather(
            *(
                workspace.post("/v1/workspace/projects", json=body, headers={**app_key(), **k})
                for _ in range(5)
            )
        )
        assert {r.status_code for r in results} == {201}
        assert len({r.json()["code"] for r in results}) == 1
        stats = await storage(workspace, uid)
        assert stats["project_count"] == 1 and stats["used_bytes"] == 1000 + len("Dup")

    async def test_same_key_other_body_is_409(self, workspace, new_user_id):
        uid = new_user_id()
        k = key()
        r = await save(workspace, uid, headers={**app_key(), **k}, content="a")
        assert r.status_code == 201
        r = await save(workspace, uid, headers={**app_key(), **k}, content="b")
        assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_reused"
        assert len(await codes(workspace, uid)) == 1


class TestUpdate:
    async def test_patch_changes_title_content_metadata_and_size(self, workspace, new_user_id):
        uid = new_user_id()
        body = await saved(workspace, uid, title="Old", content="short")
        code = body["code"]
        r = await workspace.patch(
            f"/v1/workspace/projects/{code}",
            json={"title": "New title", "content": "a much longer text", "metadata": {"v": 2}},
            headers=app_key(),
        )
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["title"] == "New title" and got["metadata"] == {"v": 2}
        assert got["size_bytes"] == len("a much longer text") + len("New title") + len('{"v":2}')
        assert got["updated_at"] > body["updated_at"]
        assert (await storage(workspace, uid))["used_bytes"] == got["size_bytes"]
        full = (await workspace.get(f"/v1/workspace/projects/{code}", headers=admin())).json()
        assert full["content"] == "a much longer text"

    async def test_patch_can_relabel_text_as_markdown(self, workspace, new_user_id):
        code = (await saved(workspace, new_user_id(), content="plain words"))["code"]
        r = await workspace.patch(
            f"/v1/workspace/projects/{code}",
            json={"content_type": "text/markdown"},
            headers=app_key(),
        )
        assert r.status_code == 200 and r.json()["content_type"] == "text/markdown"

    async def test_patch_replaces_text_with_image(self, workspace, new_user_id):
        uid = new_user_id()
        code = (await saved(workspace, uid, title="T", content="text first"))["code"]
        image = png(10, 10)
        r = await workspace.patch(
            f"/v1/workspace/projects/{code}", json={"content": data_url(image)}, headers=app_key()
        )
        assert r.status_code == 200 and r.json()["content_type"] == "image/png"
        assert r.json()["size_bytes"] == len(image) + 1
        assert (await storage(workspace, uid))["used_bytes"] == len(image) + 1


class TestDelete:
    async def test_delete_frees_space_and_the_code_is_gone(self, workspace, new_user_id):
        uid = new_user_id()
        keep = await saved(workspace, uid, content="k" * 500)
        gone = await saved(workspace, uid, content="g" * 700)
        r = await workspace.delete(f"/v1/workspace/projects/{gone['code']}", headers=app_key())
        assert r.status_code == 200
        assert r.json()["size_bytes"] == gone["size_bytes"]
        assert r.json()["storage"]["used_bytes"] == keep["size_bytes"]
        assert (await storage(workspace, uid))["used_bytes"] == keep["size_bytes"]
        r = await workspace.get(f"/v1/workspace/projects/{gone['code']}", headers=app_key())
        assert r.status_code == 404 and r.json()["error"]["code"] == "project_not_found"
        r = await workspace.delete(f"/v1/workspace/projects/{gone['code']}", headers=app_key())
        assert r.status_code == 404


class TestList:
    async def test_newest_first_with_cursor_pagination(self, workspace, new_user_id):
        uid = new_user_id()
        made = [(await saved(workspace, uid, title=f"P{i}"))["code"] for i in range(7)]
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            params = {"user_id": uid, "limit": 3, **({"cursor": cursor} if cursor else {})}
            r = await workspace.get("/v1/workspace/projects", params=params, headers=app_key())
            assert r.status_code == 200, r.text
            page = r.json()
            assert "content" not in page["items"][0]
            seen += [p["code"] for p in page["items"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == 3
        assert seen == list(reversed(made))

    async def test_filters_by_app_type_and_title(self, workspace, new_user_id):
        uid = new_user_id()
        a = (await saved(workspace, uid, title="Dragon tale", project_type="story"))["code"]
        b = (
            await saved(
                workspace,
                uid,
                title="Dragon art",
                app_source="imagegene",
                project_type="ai_artwork",
                content=b64(png()),
            )
        )["code"]
        c = (await saved(workspace, uid, title="Recipe 100%_off", project_type="notes"))["code"]
        assert set(await codes(workspace, uid)) == {a, b, c}
        assert await codes(workspace, uid, app="imagegene") == [b]
        assert await codes(workspace, uid, type="story") == [a]
        assert set(await codes(workspace, uid, q="dragon")) == {a, b}
        # LIKE wildcards in the query are literal characters
        assert await codes(workspace, uid, q="100%_") == [c]
        assert await codes(workspace, uid, q="%") == [c]

    async def test_invalid_cursor_is_400(self, workspace, new_user_id):
        r = await workspace.get(
            "/v1/workspace/projects",
            params={"user_id": new_user_id(), "cursor": "!!"},
            headers=app_key(),
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_cursor"


class TestStorage:
    async def test_stats_per_app(self, workspace, new_user_id):
        uid = new_user_id()
        p1 = await saved(workspace, uid, content="p" * 100)
        p2 = await saved(workspace, uid, content="q" * 200)
        i1 = await saved(workspace, uid, app_source="imagegene", content=b64(png()))
        stats = await storage(workspace, uid)
        total = p1["size_bytes"] + p2["size_bytes"] + i1["size_bytes"]
        assert stats["used_bytes"] == total and stats["limit_bytes"] == 1_048_576
        assert stats["available_bytes"] == 1_048_576 - total
        assert stats["percent"] == round(total * 100 / 1_048_576, 2)
        assert stats["project_count"] == 3
        assert stats["by_app"] == [
            {"app_source": "imagegene", "bytes": i1["size_bytes"], "count": 1},
            {"app_source": "penora", "bytes": p1["size_bytes"] + p2["size_bytes"], "count": 2},
        ]

    async def test_unknown_user_has_empty_storage(self, workspace, new_user_id):
        stats = await storage(workspace, new_user_id())
        assert stats["used_bytes"] == 0 and stats["available_bytes"] == 1_048_576
        assert stats["by_app"] == [] and stats["percent"] == 0
