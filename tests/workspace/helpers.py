"""Request helpers for workspace tests. Principal headers are signed per call: they expire."""

from __future__ import annotations

import base64
import io
import random
import uuid
from typing import Any

import httpx
from PIL import Image

from services.kit.testing.plugin import principal_headers

RW = ("workspace:read", "workspace:write")


def admin() -> dict[str, str]:
    return principal_headers("app", app="penora", scopes=("admin",))


FIRST_PARTY = ("penora", "imagegene")


def app_key(app: str = "penora", scopes: tuple[str, ...] = RW) -> dict[str, str]:
    """An app key; Penora's and ImageGene's are first-party (`users:any`, any user)."""
    if app in FIRST_PARTY:
        scopes = (*scopes, "users:any")
    return principal_headers("app", app=app, scopes=scopes)


def user(user_id: str, scopes: tuple[str, ...] = RW) -> dict[str, str]:
    return principal_headers("user", app="penora", user_id=user_id, scopes=scopes)


def key() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


def png(width: int = 24, height: int = 16, *, noise: bool = False, seed: int = 1) -> bytes:
    """A real PNG; with `noise` it barely compresses, so its size is about w*h*3."""
    if noise:
        rnd = random.Random(seed)
        image = Image.frombytes("RGB", (width, height), rnd.randbytes(width * height * 3))
    else:
        image = Image.new("RGB", (width, height), (200, 80, 40))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64(data)}"


async def save(
    client: httpx.AsyncClient,
    user_id: str,
    *,
    headers: dict[str, str] | None = None,
    **fields: Any,
) -> httpx.Response:
    body = {
        "user_id": user_id,
        "app_source": "penora",
        "project_type": "story",
        "title": "A story",
        "content": "Once upon a time.",
        **fields,
    }
    return await client.post("/v1/workspace/projects", json=body, headers=headers or app_key())


async def saved(client: httpx.AsyncClient, user_id: str, **fields: Any) -> dict[str, Any]:
    r = await save(client, user_id, **fields)
    assert r.status_code == 201, r.text
    return r.json()


async def storage(client: httpx.AsyncClient, user_id: str) -> dict[str, Any]:
    r = await client.get("/v1/workspace/storage", params={"user_id": user_id}, headers=admin())
    assert r.status_code == 200, r.text
    return r.json()


async def codes(client: httpx.AsyncClient, user_id: str, **params: Any) -> list[str]:
    r = await client.get(
        "/v1/workspace/projects",
        params={"user_id": user_id, "limit": 100, **params},
        headers=admin(),
    )
    assert r.status_code == 200, r.text
    return [p["code"] for p in r.json()["items"]]
