"""The seeds' save -> list -> storage-stats flow, both apps, through the gateway
against real processes."""

from __future__ import annotations

import base64
import io
import os

import httpx
import pytest
from PIL import Image

from tests.e2e.conftest import E2E
from tests.gateway.helpers import new_user_id

pytestmark = pytest.mark.e2e

SCOPES = "ledger:read,ledger:write,users:write,workspace:read,workspace:write"
MB = 1024 * 1024


@pytest.fixture(scope="module")
def keys(e2e: E2E) -> dict[str, str]:
    return {app: e2e.new_key(app, SCOPES) for app in ("penora", "imagegene")}


def png_base64(size: int = 64) -> str:
    buf = io.BytesIO()
    # Noise does not compress: the decoded size is about 3/4 of the base64 text.
    Image.frombytes("RGB", (size, size), os.urandom(size * size * 3)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class TestSharedWorkspace:
    async def test_save_list_storage_stats_both_apps(self, e2e: E2E, keys: dict[str, str]):
        user_id = new_user_id()
        penora = httpx.AsyncClient(
            base_url=e2e.gateway, headers={"X-API-Key": keys["penora"]}, timeout=10
        )
        imagegene = httpx.AsyncClient(
            base_url=e2e.gateway, headers={"X-API-Key": keys["imagegene"]}, timeout=10
        )
        async with penora, imagegene:
            r = await imagegene.post(
                "/api/unified/create-user",
                json={"user_id": user_id, "username": "Both Apps", "email": "both@example.com"},
            )
            assert r.status_code == 201, r.text

            story = "Once upon a time. " * 3000  # 54,000 bytes of text
            r = await penora.post(
                "/api/unified/save-project",
                json={
                    "user_id": user_id,
                    "app_source": "penora",
                    "project_type": "story",
                    "title": "A long story",
                    "content": story,
                    "metadata": {"model": "mistral"},
                },
            )
            assert r.status_code == 200, r.text
            saved_text = r.json()
            assert saved_text["success"] is True and len(saved_text["project_code"]) == 6

            image = png_base64()
            r = await imagegene.post(
                "/api/unified/save-project",
                json={
                    "user_id": user_id,
                    "app_source": "imagegene",
                    "project_type": "ai_artwork",
                    "title": "Sunset Landscape AI Art",
                    "content": image,
                    "metadata": {"style": "realistic", "dimensions": "64x64"},
                },
            )
            assert r.status_code == 200, r.text
            saved_image = r.json()
            assert saved_image["content_type"] == "image/png"
            # The stored size is the decoded image, not its base64 text.
            assert saved_image["size_bytes"] < len(image)

            # Either app sees both projects.
            r = await imagegene.get("/api/unified/projects", params={"user_id": user_id})
            assert r.status_code == 200, r.text
            listing = r.json()
            assert listing["success"] is True
            assert (
                listing["total_count"],
                listing["penora_count"],
                listing["imagegene_count"],
            ) == (2, 1, 1)
            assert listing["penora_projects"][0]["code"] == saved_text["project_code"]
            assert listing["imagegene_projects"][0]["code"] == saved_image["project_code"]

            r = await penora.get("/api/unified/storage-stats", params={"user_id": user_id})
            assert r.status_code == 200, r.text
            stats = r.json()
            used = saved_text["size_bytes"] + saved_image["size_bytes"]
            assert stats["storage_stats"]["used_bytes"] == used
            assert stats["storage_stats"]["used_mb"] == round(used / MB, 2)
            assert stats["storage_stats"]["limit_mb"] == 1.0
            assert stats["breakdown"]["penora_mb"] == round(saved_text["size_bytes"] / MB, 2)
            assert (
                stats["breakdown"]["penora_projects"],
                stats["breakdown"]["imagegene_projects"],
            ) == (1, 1)

            r = await penora.get("/api/unified/user-info", params={"user_id": user_id})
            assert r.json()["credits"] == 50
            assert r.json()["storage"]["used_mb"] == round(used / MB, 2)

            # The shared 1 MB fills up across apps: 413 with the seed's body.
            r = await penora.post(
                "/api/unified/save-project",
                json={
                    "user_id": user_id,
                    "app_source": "penora",
                    "project_type": "story",
                    "title": "Big",
                    "content": "x" * 600_000,
                },
            )
            assert r.status_code in (200, 201), r.text
            used += r.json()["size_bytes"]
            r = await penora.post(
                "/api/unified/save-project",
                json={
                    "user_id": user_id,
                    "app_source": "penora",
                    "project_type": "story",
                    "title": "Too big",
                    "content": "x" * 600_000,
                },
            )
            assert r.status_code == 413
            assert r.json()["success"] is False and r.json()["error"] == "Storage limit exceeded"
            assert "would exceed 1MB limit" in r.json()["details"]
            r = await penora.get("/api/unified/storage-stats", params={"user_id": user_id})
            assert r.json()["storage_stats"]["used_bytes"] == used
