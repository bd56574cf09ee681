"""Audit: what the public door answers to credentials it must refuse.

A token header's `alg` and `kid` are any JSON: a list or an object is a 401 like any
other bad token (it was a 500: the values were looked up in dicts). The key printed in
the old docs is refused on every route, in every place a credential can travel."""

from __future__ import annotations

import base64

import httpx
import orjson
import pytest

from tests.gateway.conftest import Stack
from tests.gateway.helpers import SEED_KEY, new_user_id

INVALID_KEY = "Invalid or missing API key. Include X-API-Key header or api_key parameter."
# A user id in each route's query: the routes take one, the answer must not get that far.
ROUTES = [
    ("GET", "/v1/ledger/balance?user_id={u}"),
    ("POST", "/v1/ledger/debits"),
    ("GET", "/v1/users/{u}"),
    ("GET", "/v1/events?user_id={u}"),
    ("POST", "/v1/events/tickets"),
    ("GET", "/api/unified/user-info?user_id={u}"),
    ("POST", "/api/unified/deduct-credits"),
    ("GET", "/api/unified/transactions?user_id={u}"),
    ("POST", "/api/unified/create-user"),
    ("GET", "/api/enhance-image?limit=1"),
    ("GET", "/api/admin/credit-stats"),
]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def with_header(token: str, header: dict[str, object]) -> str:
    _, payload, signature = token.split(".")
    return f"{_b64(orjson.dumps(header))}.{payload}.{signature}"


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "RS256", "kid": ["k"]},
        {"alg": "RS256", "kid": {"k": 1}},
        {"alg": ["RS256"], "kid": "k"},
        {"alg": {"RS256": 1}, "kid": "k"},
        {"alg": "RS256", "kid": None},
    ],
    ids=["kid list", "kid object", "alg list", "alg object", "kid null"],
)
async def test_odd_token_headers_are_401(
    gw: httpx.AsyncClient, stack: Stack, header: dict[str, object]
):
    user_id = new_user_id()
    header = {**header, "kid": stack.signing.kid} if header["kid"] == "k" else header
    token = with_header(stack.signing.token(user_id), header)
    auth = {"Authorization": f"Bearer {token}"}
    for _ in range(2):  # the second time, the JWKS is cached (the first fetched it)
        for method, path in ROUTES:
            r = await gw.request(method, path.format(u=user_id), headers=auth, json={})
            assert r.status_code == 401, (header, path, r.text)


async def test_the_seed_key_opens_nothing(gw: httpx.AsyncClient):
    user_id = new_user_id()
    ways = {
        "header": ({"X-API-Key": SEED_KEY}, ""),
        "bearer": ({"Authorization": f"Bearer {SEED_KEY}"}, ""),
        "query": ({}, f"api_key={SEED_KEY}"),
    }
    for name, (headers, query) in ways.items():
        for method, path in ROUTES:
            url = path.format(u=user_id)
            if query:
                url += ("&" if "?" in url else "?") + query
            r = await gw.request(method, url, headers=headers, json={"user_id": user_id})
            assert r.status_code == 401, (name, path, r.text)
            if path.startswith("/api/"):
                assert r.json()["success"] is False and r.json()["error"] == INVALID_KEY
