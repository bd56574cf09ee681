"""Bad input and lost connections against the real processes (issue 9).

- 500 concurrent debits over 50 users through the ledger's HTTP API, 1 in 10 carrying
  a NUL (or an unpaired surrogate) in `description` or `reference`: every clean one is
  a 201, every poisoned one a 422 JSON naming the field; none fails its neighbours.
- The same for workspace saves and auth user creation, and for the compat API.
- Every backend of the test database terminated (a failover), with the pools idle and
  then mid-load: afterwards no 5xx from the workspace, auth, the ledger's reads and its
  debits (each write under an Idempotency-Key); while it happens, at worst a JSON 503
  with Retry-After; never a plain-text body.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from services.kit.db import plain_url
from services.kit.testing.plugin import principal_headers
from tests.e2e.conftest import E2E

pytestmark = pytest.mark.e2e

POISONS = ("nul\x00byte", "\x00", "lone \ud800 surrogate", "tail\udfff")


def ids(n: int) -> list[str]:
    return [str(10**20 + random.randrange(10**20)) for _ in range(n)]


OPERATOR = ("users:any", "ledger:read", "ledger:write", "ledger:grant", "workspace:read")


def admin(audience: str = "ledger") -> dict[str, str]:
    """Penora's first-party key with the read and grant scopes (what setup needs)."""
    return principal_headers("app", audience=audience, app="penora", scopes=OPERATOR)


def penora(*scopes: str) -> dict[str, str]:
    """Penora's first-party key with `scopes`, signed for the service they belong to."""
    if any(s.startswith("workspace:") for s in scopes):
        audience = "workspace"
    elif any(s.startswith("ledger:") for s in scopes):
        audience = "ledger"
    else:
        audience = "auth"
    return principal_headers("app", audience=audience, app="penora", scopes=(*scopes, "users:any"))


async def post(
    client: httpx.AsyncClient, url: str, body: Any, headers: dict[str, str]
) -> httpx.Response:
    """POST JSON as ASCII (`\\ud800` escapes): httpx's `json=` cannot encode a lone
    surrogate, but any client can send its escape."""
    content = json.dumps(body).encode()
    return await client.post(
        url, content=content, headers={**headers, "content-type": "application/json"}
    )


def is_json(r: httpx.Response) -> bool:
    try:
        r.json()
    except ValueError:
        return False
    return r.headers.get("content-type", "").startswith("application/json")


async def gather_limited(n: int, calls: list[Any]) -> list[httpx.Response]:
    gate = asyncio.Semaphore(n)

    async def run(call: Any) -> httpx.Response:
        async with gate:
            result: httpx.Response = await call()
            return result

    return await asyncio.gather(*(run(c) for c in calls))


def assert_poisoned(r: httpx.Response, field: str) -> None:
    assert r.status_code == 422 and is_json(r), r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_text", r.text
    assert any(e["loc"][-1] == field for e in error["detail"]["errors"]), r.text


async def fund(client: httpx.AsyncClient, ledger: str, user: str, amount: int) -> None:
    r = await post(
        client,
        ledger + "/v1/ledger/accounts",
        {"user_id": user, "welcome": False},
        {**admin(), "Idempotency-Key": uuid.uuid4().hex},
    )
    assert r.status_code in (200, 201), r.text
    r = await post(
        client,
        ledger + "/v1/ledger/grants",
        {"user_id": user, "amount": amount, "source": "promo"},
        {**admin(), "Idempotency-Key": uuid.uuid4().hex},
    )
    assert r.status_code == 201, r.text


class TestPoisonedText:
    async def test_500_debits_over_50_users_one_in_ten_poisoned(self, e2e: E2E) -> None:
        ledger = e2e.suite.urls["ledger"]
        users = ids(50)
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=ledger, timeout=60, limits=limits) as client:
            for user in users:
                await fund(client, ledger, user, 100)
            plan: list[tuple[str, str | None, dict[str, Any]]] = []
            poisoned = set(random.Random(9).sample(range(500), 50))
            for i in range(500):
                body: dict[str, Any] = {
                    "user_id": users[i % 50],
                    "amount": 1,
                    "app": "penora",
                    "description": f"debit {i}",
                    "reference": f"ref-{uuid.uuid4().hex}",
                }
                field = None
                if i in poisoned:
                    field = "description" if i % 2 else "reference"
                    body[field] = f"{i} " + POISONS[i % len(POISONS)]
                plan.append((users[i % 50], field, body))
            headers = penora("ledger:read", "ledger:write")

            def call(body: dict[str, Any]) -> Any:
                return lambda: post(client, "/v1/ledger/debits", body, headers)

            answers = await gather_limited(64, [call(body) for _, _, body in plan])
            clean: dict[str, int] = {}
            for (user, field, _), r in zip(plan, answers, strict=True):
                if field is None:
                    assert r.status_code == 201, r.text
                    clean[user] = clean.get(user, 0) + 1
                else:
                    assert_poisoned(r, field)
            assert sum(clean.values()) == 450
            for user in users:
                r = await client.get(
                    "/v1/ledger/balance", params={"user_id": user}, headers=admin()
                )
                assert r.json()["available"] == 100 - clean.get(user, 0), (user, r.text)

    async def test_holds_grants_and_refunds_refuse_it_too(self, e2e: E2E) -> None:
        (user,) = ids(1)
        async with httpx.AsyncClient(base_url=e2e.suite.urls["ledger"], timeout=30) as client:
            cases = [
                ("/v1/ledger/grants", {"amount": 5, "source": "promo"}, "reference"),
                ("/v1/ledger/grants", {"amount": 5, "source": "promo"}, "description"),
                ("/v1/ledger/holds", {"amount": 1, "app": "penora"}, "reference"),
                ("/v1/ledger/holds", {"amount": 1, "app": "penora"}, "description"),
            ]
            for path, body, field in cases:
                for poison in POISONS:
                    r = await post(
                        client,
                        path,
                        {"user_id": user, **body, field: poison},
                        {**admin(), "Idempotency-Key": uuid.uuid4().hex},
                    )
                    assert_poisoned(r, field)
            r = await post(
                client,
                "/v1/ledger/refunds",
                {"transaction_id": 1, "description": "x\x00"},
                {**admin(), "Idempotency-Key": uuid.uuid4().hex},
            )
            assert_poisoned(r, "description")
            # In the URL: a NUL in a path or query parameter is refused before any route.
            for url in ("/v1/ledger/balance?user_id=%00", "/v1/ledger/holds/%00abc"):
                r = await client.get(url, headers=admin())
                assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_text"

    async def test_workspace_saves_with_poisoned_title_content_or_metadata(self, e2e: E2E) -> None:
        users = ids(10)
        plan: list[tuple[str | None, dict[str, Any]]] = []
        for i in range(100):
            body: dict[str, Any] = {
                "user_id": users[i % 10],
                "app_source": "penora",
                "project_type": "story",
                "title": f"Story {i}",
                "content": f"Once upon a time, {i}.",
                "metadata": {"words": i, "tags": ["a", {"deep": "ok"}]},
            }
            field = None
            if i % 10 == 3:
                field, poison = ("title", "content", "metadata")[i // 10 % 3], POISONS[i % 4]
                if field == "metadata":
                    body[field] = {"tags": ["a", {"deep": poison}]}
                else:
                    body[field] = poison
            plan.append((field, body))
        headers = penora("workspace:read", "workspace:write")
        url = e2e.suite.urls["workspace"]
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            answers = await gather_limited(
                32,
                [
                    (lambda b=body: post(client, "/v1/workspace/projects", b, headers))
                    for _, body in plan
                ],
            )
            for (field, _), r in zip(plan, answers, strict=True):
                if field is None:
                    assert r.status_code == 201, r.text
                else:
                    assert_poisoned(r, field)
            # A metadata key is text too.
            body = {**plan[0][1], "metadata": {"k\x00": 1}}
            assert_poisoned(
                await post(client, "/v1/workspace/projects", body, headers),
                "metadata",
            )

    async def test_auth_user_create_with_poisoned_email_or_name(self, e2e: E2E) -> None:
        headers = penora("users:write")
        new = ids(40)
        plan: list[tuple[str | None, dict[str, Any]]] = []
        for i, user in enumerate(new):
            body: dict[str, Any] = {"user_id": user, "email": f"u{i}@example.com"}
            field = None
            if i % 4 == 1:
                field = "email"
                body["email"] = f"u{i}\x00@example.com" if i % 8 == 1 else f"u{i}@ex\ud800.com"
            elif i % 4 == 2:
                field = "username"
                body["username"] = POISONS[i % 4]
            plan.append((field, body))
        async with httpx.AsyncClient(base_url=e2e.suite.urls["auth"], timeout=60) as client:
            answers = await gather_limited(
                16,
                [(lambda b=body: post(client, "/v1/users", b, headers)) for _, body in plan],
            )
        for (field, _), r in zip(plan, answers, strict=True):
            if field is None:
                assert r.status_code == 201, r.text
            else:
                assert_poisoned(r, field)

    async def test_compat_api_answers_in_the_seeds_shape(self, e2e: E2E) -> None:
        api_key = e2e.new_key("penora", "ledger:read,ledger:write,workspace:write,users:write")
        (user,) = ids(1)
        headers = {"X-API-Key": api_key}
        async with httpx.AsyncClient(base_url=e2e.gateway, timeout=30) as client:
            deduct, save = "/api/unified/deduct-credits", "/api/unified/save-project"
            cases = [
                (deduct, {"user_id": user, "amount": 1, "description": "a\x00"}),
                (deduct, {"user_id": user, "amount": 1, "project_code": "\ud800"}),
                (save, {"user_id": user, "content": "x", "metadata": {"m": "\x00"}}),
                (save, {"user_id": user, "content": "lone \udc00"}),
                ("/api/unified/create-user", {"user_id": user, "email": "a\x00@b.c"}),
            ]
            for path, body in cases:
                r = await post(client, path, body, headers)
                assert r.status_code == 422 and is_json(r), (path, r.text)
                answer = r.json()
                assert answer["success"] is False and answer["code"] == "invalid_text", r.text
            # Proxied native routes: the service's own 422.
            r = await client.get("/v1/ledger/balance", params={"user_id": "\x00"}, headers=headers)
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_text", r.text


def errors_logged(e2e: E2E) -> list[str]:
    return [
        line
        for name in ("auth", "ledger", "workspace")
        for line in e2e.suite.logs(name)
        if "ku.errors" in line or "Traceback" in line
    ]


class TestDatabaseRestart:
    async def test_no_5xx_after_every_backend_is_terminated(self, e2e: E2E) -> None:
        urls = e2e.suite.urls
        users = ids(8)
        async with httpx.AsyncClient(timeout=30) as client:
            for user in users:
                await fund(client, urls["ledger"], user, 50)
                r = await post(
                    client,
                    urls["auth"] + "/v1/users",
                    {"user_id": user, "email": f"{user}@example.com"},
                    penora("users:write"),
                )
                assert r.status_code in (200, 201), r.text

            def calls() -> list[Any]:
                out: list[Any] = []
                for user in users:
                    out += [
                        lambda u=user: client.get(
                            urls["ledger"] + "/v1/ledger/balance",
                            params={"user_id": u}, headers=admin(),
                        ),
                        lambda u=user: client.get(
                            urls["ledger"] + "/v1/ledger/transactions",
                            params={"user_id": u}, headers=admin(),
                        ),
                        lambda u=user: client.get(
                            urls["auth"] + f"/v1/users/{u}", headers=penora("users:write")
                        ),
                        lambda u=user: client.get(
                            urls["workspace"] + "/v1/workspace/storage",
                            params={"user_id": u}, headers=admin("workspace"),
                        ),
                        lambda u=user: post(
                            client, urls["ledger"] + "/v1/ledger/debits",
                            {"user_id": u, "amount": 1, "app": "penora"},
                            {**penora("ledger:read", "ledger:write"),
                             "Idempotency-Key": uuid.uuid4().hex},
                        ),
                        lambda u=user: post(
                            client, urls["workspace"] + "/v1/workspace/projects",
                            {"user_id": u, "app_source": "penora", "title": "t", "content": "c"},
                            {**penora("workspace:read", "workspace:write"),
                             "Idempotency-Key": uuid.uuid4().hex},
                        ),
                    ]  # fmt: skip
                return out

            warm = await gather_limited(16, calls() * 2)  # every pool holds connections
            assert all(r.status_code < 500 for r in warm), [r.text for r in warm]

            async def terminate(delay: float = 0.0) -> int:
                await asyncio.sleep(delay)
                conn = await asyncpg.connect(plain_url(e2e.suite.env["KU_DATABASE_URL"]))
                try:
                    killed: int = await conn.fetchval(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                    return killed
                finally:
                    await conn.close()

            # Idle pools: every pooled connection is dead; the first request on each must
            # not notice (the pool replaces a closed connection at checkout).
            assert await terminate() >= 4  # the pools of three services, at least
            await asyncio.sleep(0.2)
            first = await gather_limited(16, calls() * 2)
            assert [(r.status_code, r.text) for r in first if r.status_code >= 300] == []

            # Mid-load: what was in flight may fail, as JSON and retryable.
            during, killed = await asyncio.gather(gather_limited(16, calls() * 3), terminate(0.05))
            assert killed >= 4
            # In flight while it happened: JSON, and at worst a retryable 503.
            for r in during:
                assert is_json(r), r.text
                assert r.status_code < 500 or (
                    r.status_code == 503 and r.headers.get("retry-after")
                ), (r.text, errors_logged(e2e))
            after = await gather_limited(16, calls() * 3)
            bad = [
                (str(r.request.url), r.status_code, r.text) for r in after if r.status_code >= 500
            ]
            assert bad == []
            assert all(is_json(r) for r in after)
            assert all(r.status_code in (200, 201) for r in after), [r.text for r in after]
