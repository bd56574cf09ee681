"""Every rejection is a clear 4xx with a machine-readable code, and stores nothing."""

from __future__ import annotations

import base64
import io

from PIL import Image

from tests.workspace.helpers import admin, app_key, b64, data_url, key, png, save, saved, storage


def _huge_png() -> bytes:
    out = io.BytesIO()
    Image.new("1", (6000, 5000)).save(out, format="PNG", optimize=True)
    return out.getvalue()


def _bmp() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 4)).save(out, format="BMP")
    return out.getvalue()


class TestCreateRejections:
    async def test_rejections_write_nothing(self, workspace, new_user_id):
        uid = new_user_id()
        cases = [
            ({"content": "data:image/png;base64,@@not-base64@@"}, 422, "invalid_base64"),
            ({"content": "abc$%^", "content_encoding": "base64"}, 422, "invalid_base64"),
            ({"content": "QUJD=", "content_encoding": "base64"}, 422, "invalid_base64"),
            (
                {"content": data_url(b"%PDF-1.4\x00\xff binary", "application/pdf")},
                415,
                "content_type_not_allowed",
            ),
            (
                {"content": data_url(b"<svg onload=alert(1)/>", "image/svg+xml")},
                415,
                "content_type_not_allowed",
            ),
            ({"content": data_url(b"<b>hi</b>", "text/html")}, 415, "content_type_not_allowed"),
            ({"content": b64(_bmp())}, 415, "content_type_not_allowed"),
            (
                {"content": b64(b"\x00\xff\xfe\x80" * 40), "content_encoding": "base64"},
                415,
                "content_type_not_allowed",
            ),
            (
                {"content": "hello", "content_type": "application/x-sh"},
                415,
                "content_type_not_allowed",
            ),
            ({"content": "hello", "content_type": "image/png"}, 422, "content_type_mismatch"),
            ({"content": b64(png()), "content_type": "image/jpeg"}, 422, "content_type_mismatch"),
            ({"content": "nul\x00byte"}, 422, "invalid_text"),
            ({"content": b64(_huge_png())}, 422, "image_too_large"),
            ({"metadata": {"blob": "m" * 17_000}}, 422, "metadata_too_large"),
            ({"metadata": ["not", "an", "object"]}, 422, "validation_error"),
            ({"title": ""}, 422, "validation_error"),
            ({"title": "   "}, 422, "validation_error"),
            ({"title": "t" * 201}, 422, "validation_error"),
            ({"title": "line\nbreak"}, 422, "validation_error"),
            ({"content": None}, 422, "validation_error"),
            ({"app_source": "Bad App!"}, 422, "validation_error"),
            ({"project_type": "x" * 65}, 422, "validation_error"),
            ({"surprise": 1}, 422, "validation_error"),
            ({"content_encoding": "rot13"}, 422, "validation_error"),
        ]
        for fields, status, code in cases:
            r = await save(workspace, uid, **fields)
            assert r.status_code == status, (fields, r.text)
            assert r.json()["error"]["code"] == code, (fields, r.text)
        r = await workspace.post(
            "/v1/workspace/projects", json={"title": "t", "content": "c"}, headers=app_key()
        )
        assert r.status_code == 422 and r.json()["error"]["code"] == "user_id_required"
        r = await workspace.post(
            "/v1/workspace/projects",
            content=b'{"title": ',
            headers={**app_key(), "content-type": "application/json"},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json"
        r = await save(workspace, uid, headers={**app_key(), "Idempotency-Key": "k" * 201})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_idempotency_key"
        stats = await storage(workspace, uid)
        assert stats["used_bytes"] == 0 and stats["project_count"] == 0

    async def test_a_failed_save_does_not_burn_its_idempotency_key(self, workspace, new_user_id):
        uid = new_user_id()
        k = key()
        r = await save(workspace, uid, headers={**app_key(), **k}, metadata={"m": "m" * 17_000})
        assert r.status_code == 422
        r = await save(workspace, uid, headers={**app_key(), **k}, metadata={"m": "m" * 17_000})
        assert r.status_code == 422 and "idempotent-replayed" not in r.headers
        assert (await storage(workspace, uid))["project_count"] == 0

    async def test_plain_long_base64_text_that_is_no_image_stays_text(self, workspace, new_user_id):
        # old clients send "base64 or text" in one field: only real images are decoded
        text = base64.b64encode(b"just some words, " * 10).decode()
        body = await saved(workspace, new_user_id(), content=text)
        assert body["content_type"] == "text/plain"
        assert body["size_bytes"] == len(text) + len("A story")


class TestUnknownCode:
    async def test_unknown_and_malformed_codes_are_404(self, workspace, new_user_id):
        for code in ("ZZZZZZ", "AAAAA0", "abc", "O0I1L1", "X" * 16):
            for method, path in (
                ("GET", ""),
                ("GET", "/content"),
                ("GET", "/export?format=pdf"),
                ("DELETE", ""),
            ):
                r = await workspace.request(
                    method, f"/v1/workspace/projects/{code}{path}", headers=admin()
                )
                assert r.status_code == 404, (code, path, r.text)
                assert r.json()["error"]["code"] == "project_not_found"
            r = await workspace.patch(
                f"/v1/workspace/projects/{code}", json={"title": "x"}, headers=admin()
            )
            assert r.status_code == 404


class TestUpdateRejections:
    async def test_bad_update_changes_nothing(self, workspace, new_user_id):
        uid = new_user_id()
        p = await saved(workspace, uid, title="Keep", content="keep me", metadata={"a": 1})
        for fields, status, code in [
            ({"title": ""}, 422, "validation_error"),
            ({"content": "data:image/png;base64,###"}, 422, "invalid_base64"),
            ({"metadata": {"x": "y" * 20_000}}, 422, "metadata_too_large"),
            (
                {"content": data_url(b"MZ\x90\x00", "application/octet-stream")},
                415,
                "content_type_not_allowed",
            ),
            ({"content_type": "image/png"}, 422, "content_type_mismatch"),
            ({"owner": "someone"}, 422, "validation_error"),
        ]:
            r = await workspace.patch(
                f"/v1/workspace/projects/{p['code']}", json=fields, headers=app_key()
            )
            assert r.status_code == status, (fields, r.text)
            assert r.json()["error"]["code"] == code
        got = (await workspace.get(f"/v1/workspace/projects/{p['code']}", headers=admin())).json()
        assert (got["title"], got["content"], got["metadata"]) == ("Keep", "keep me", {"a": 1})
        assert got["updated_at"] == p["updated_at"]
        assert (await storage(workspace, uid))["used_bytes"] == p["size_bytes"]


class TestListRejections:
    async def test_list_needs_a_user_and_valid_params(self, workspace, new_user_id):
        r = await workspace.get("/v1/workspace/projects", headers=app_key())
        assert r.status_code == 422 and r.json()["error"]["code"] == "user_id_required"
        for params in ({"limit": 0}, {"limit": 101}, {"app": "NO!"}):
            r = await workspace.get(
                "/v1/workspace/projects",
                params={"user_id": new_user_id(), **params},
                headers=app_key(),
            )
            assert r.status_code == 422, params
