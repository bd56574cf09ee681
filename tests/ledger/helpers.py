"""Request helpers for ledger tests. Principal headers are signed per call: they expire."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from services.kit.testing.plugin import principal_headers


def operator() -> dict[str, str]:
    """Penora's first-party key with every ledger scope: what tests use to set users up
    (open accounts, grant credit, read anything). Not an admin: see `admin()`."""
    return principal_headers(
        "app",
        app="penora",
        scopes=("users:any", "users:write", "ledger:read", "ledger:write", "ledger:grant"),
    )


def admin() -> dict[str, str]:
    """A real admin key: money operations need a `reason` (audited)."""
    return principal_headers("app", app="ops", scopes=("admin",))


def app_key(app: str = "penora", *scopes: str) -> dict[str, str]:
    """An app key with ledger read/write; Penora's and ImageGene's are first-party."""
    first_party = ("users:any",) if app in ("penora", "imagegene") else ()
    return principal_headers(
        "app", app=app, scopes=("ledger:read", "ledger:write", *first_party, *scopes)
    )


def penora() -> dict[str, str]:
    return app_key("penora")


def imagegene() -> dict[str, str]:
    return app_key("imagegene")


def key() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


async def balance(ledger: httpx.AsyncClient, user_id: str) -> dict[str, Any]:
    r = await ledger.get("/v1/ledger/balance", params={"user_id": user_id}, headers=admin())
    assert r.status_code == 200, r.text
    return r.json()
