"""Audit: the old clients' enhancement routes (`gateway.compat.enhance`) apply the
checks the native route gets through the proxy, and build no other path upstream than
the one they name. An echo upstream stands for the enhancement service."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.gateway.conftest import Stack
from tests.gateway.helpers import new_user_id
from tests.gateway.test_audit_user_check import Echo, gateway_before


@pytest.fixture
async def echo() -> Echo:
    return Echo()


@pytest.fixture
async def front(stack: Stack, echo: Echo) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_before(stack, "enhancement", echo) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            yield client


def user(stack: Stack, user_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.signing.token(user_id, scope='enhance')}"}


async def test_user_token_names_no_other_user(front: httpx.AsyncClient, stack: Stack, echo: Echo):
    me, victim = new_user_id(), new_user_id()
    image = {"inputImageUrl": "https://example.com/a.jpg", "userId": victim}
    r = await front.post("/api/enhance-image", json=image, headers=user(stack, me))
    assert r.status_code == 403, r.text
    assert r.json() == {
        "success": False,
        "error": "A user token may act only on its own user",
        "code": "wrong_user",
    }
    r = await front.get("/api/enhance-image", params={"userId": victim}, headers=user(stack, me))
    assert r.status_code == 403, r.text
    assert r.json()["success"] is False and r.json()["code"] == "wrong_user"
    assert echo.seen == []


@pytest.mark.parametrize(
    "task_id", ["../stats", "../../ledger", "x?user_id=1", "x#", "a/b", "%2e%2e", "nope"]
)
async def test_task_id_is_a_task_id(
    front: httpx.AsyncClient, stack: Stack, echo: Echo, task_id: str
):
    r = await front.get("/api/enhance-image", params={"taskId": task_id}, headers=user(stack, "1"))
    assert r.status_code == 404, r.text
    assert r.json()["success"] is False and r.json()["code"] == "task_not_found"
    assert echo.seen == []


@pytest.mark.parametrize("provider", ["../../tasks/x/cancel", "x?y=1", "a/b", "A#"])
async def test_refill_provider_is_a_name(
    front: httpx.AsyncClient, stack: Stack, echo: Echo, admin_key: str, provider: str
):
    r = await front.post(
        "/api/admin/refill-credits",
        json={"provider": provider, "amount": 5},
        headers={"X-API-Key": admin_key},
    )
    assert r.status_code == 404, r.text
    assert r.json()["success"] is False and r.json()["code"] == "unknown_provider"
    assert echo.seen == []


async def test_client_sent_origin_header_is_stripped(
    front: httpx.AsyncClient, stack: Stack, echo: Echo
):
    r = await front.get(
        "/v1/enhancement/tasks",
        headers={**user(stack, "1"), "X-Ku-Origin": "forged", "X-Ku-Principal": "forged"},
    )
    assert r.status_code == 200, r.text
    headers = echo.seen[-1]["headers"]
    assert "x-ku-principal" in headers  # the gateway's own
    assert "x-ku-origin" not in headers


async def test_project_by_code_names_no_other_user(gw: httpx.AsyncClient, stack: Stack):
    """`/api/project/<code>?user_id=` checks a user token's user id at the gateway, as the
    native `/v1/workspace/projects/<code>?user_id=` does (the workspace is down here:
    a request that got past the gateway would be a 502)."""
    me, victim = new_user_id(), new_user_id()
    auth = {"Authorization": f"Bearer {stack.signing.token(me, scope='workspace:read')}"}
    r = await gw.get("/api/project/ABC234", params={"user_id": victim}, headers=auth)
    assert r.status_code == 403, r.text
    assert r.json()["success"] is False and r.json()["code"] == "wrong_user"
    native = await gw.get("/v1/workspace/projects/ABC234", params={"user_id": victim}, headers=auth)
    assert native.status_code == 403


async def test_a_failure_nobody_expected_keeps_the_old_clients_shape(stack: Stack) -> None:
    """A compat route that fails on a service's answer it cannot read (here: a workspace
    that answers anything with an echo of the request) is a 500 in the seeds' shape, with
    the request id, not the native `{"error": {...}}` an old client cannot read."""
    me = new_user_id()
    auth = {"Authorization": f"Bearer {stack.signing.token(me)}"}
    async with gateway_before(stack, "workspace", Echo()) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            r = await client.get("/api/unified/projects", params={"user_id": me}, headers=auth)
    assert r.status_code == 500, r.text
    body = r.json()
    assert body["success"] is False and body["code"] == "internal_error", body
    assert body["request_id"] == r.headers["x-request-id"]
