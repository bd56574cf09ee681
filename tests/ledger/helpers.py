"""Request helpers for ledger tests. Principal headers are signed per call: they expire."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from services.kit.testing.plugin import principal_headers


def admin() -> dict[str, str]:
    return principal_headers("app", app="penora", scopes=("admin",))


def penora() -> dict[str, str]:
    return principal_headers("app", app="penora", scopes=("ledger:read", "ledger:write"))


def key() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


async def balance(ledger: httpx.AsyncClient, user_id: str) -> dict[str, Any]:
    r = await ledger.get("/v1/ledger/balance", params={"user_id": user_id}, headers=admin())
    assert r.status_code == 200, r.text
    return r.json()
