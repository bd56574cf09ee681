"""The authority table through real gateway processes: real keys (`ku keys create`),
real user tokens, links made through auth's API (and its `user.linked` events). The
same expectations as tests/test_authority.py, computed from the code's table."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest
from jose import jwt

from tests.e2e.conftest import E2E, SSO_SECRET
from tests.gateway.helpers import new_user_id
from tests.test_authority import ROUTES, USER_SCOPES, Route, _body, expected

pytestmark = pytest.mark.e2e

ALL = "ledger:read,ledger:write,ledger:grant,workspace:read,workspace:write,users:write"
KINDS = ("user", "first_party", "partner", "other_app", "admin", "none")


class Callers:
    def __init__(self, e2e: E2E) -> None:
        self.e2e = e2e
        self.keys = {
            "first_party": e2e.new_key("penora", ALL),
            "partner": e2e.new_key("partnerx", ALL),
            "other_app": e2e.new_key("otherapp", ALL),
            "admin": e2e.new_key("ops", "admin"),
        }

    def headers(self, kind: str, user_id: str) -> dict[str, str]:
        out = {"Idempotency-Key": uuid.uuid4().hex}
        if kind == "user":
            token = self.e2e.signing.token(user_id, scope=" ".join(USER_SCOPES), app="penora")
            out["Authorization"] = f"Bearer {token}"
        elif kind in self.keys:
            out["X-API-Key"] = self.keys[kind]
        return out


@pytest.fixture(scope="module")
def callers(e2e: E2E) -> Callers:
    return Callers(e2e)


async def _ok(r: httpx.Response) -> Any:
    assert r.status_code < 300, r.text
    return r.json()


async def eventually(check: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
async def target(e2e: E2E, callers: Callers) -> str:
    """A user with 1,000 Ku, linked to partnerx by an admin (auth → user.linked)."""
    user_id = new_user_id()
    async with httpx.AsyncClient(base_url=e2e.gateway, timeout=15) as gw:
        fp = callers.headers("first_party", user_id)
        await _ok(
            await gw.post("/v1/users", json={"user_id": user_id, "email": "t@x.io"}, headers=fp)
        )
        await _ok(await gw.post("/v1/ledger/accounts", json={"user_id": user_id}, headers=fp))
        await _ok(
            await gw.post(
                "/v1/ledger/grants",
                json={"user_id": user_id, "amount": 1000, "source": "promo"},
                headers=callers.headers("first_party", user_id),
            )
        )
        r = await gw.post(
            f"/v1/users/{user_id}/apps",
            json={"app": "partnerx"},
            headers=callers.headers("admin", user_id),
        )
        assert r.status_code == 200 and "partnerx" in r.json()["apps"], r.text

        async def linked_everywhere() -> bool:
            h = callers.headers("partner", user_id)
            a = await gw.get("/v1/ledger/balance", params={"user_id": user_id}, headers=h)
            b = await gw.get("/v1/workspace/storage", params={"user_id": user_id}, headers=h)
            return a.status_code == 200 and b.status_code == 200

        await eventually(linked_everywhere)
    return user_id


async def _prepare(gw: httpx.AsyncClient, callers: Callers, kind: str, route: Route, user: str):
    maker = kind if kind in ("first_party", "partner", "admin") else "first_party"
    ids = {"user": user}
    if "{draw}" in route.path:
        # Only the enhancement service draws (no caller here may resolve a draw): a
        # reference never drawn; the table answers before the ledger looks it up.
        ids["draw"] = f"enhancement:{uuid.uuid4()}"
    if "{hold}" in route.path:
        body = {"user_id": user, "amount": 1, "reason": "authority test"}
        hold = await _ok(
            await gw.post("/v1/ledger/holds", json=body, headers=callers.headers(maker, user))
        )
        ids["hold"] = hold["hold"]["id"]
    if route.operation == "ledger.refund":
        body = {"user_id": user, "amount": 1, "reason": "authority test"}
        charge = await _ok(
            await gw.post("/v1/ledger/debits", json=body, headers=callers.headers(maker, user))
        )
        ids["charge"] = str(charge["transaction_id"])
    if "{code}" in route.path:
        body = {"user_id": user, "title": "t", "content": "x", "app_source": "penora"}
        h = callers.headers("first_party", user)
        ids["code"] = (await _ok(await gw.post("/v1/workspace/projects", json=body, headers=h)))[
            "code"
        ]
    return ids


CASES = [(kind, route) for route in ROUTES for kind in KINDS]


@pytest.mark.parametrize(
    ("kind", "route"), CASES, ids=[f"{r.method} {r.path} as {k}" for k, r in CASES]
)
async def test_the_table_decides_through_the_gateway(
    e2e: E2E, callers: Callers, target: str, kind: str, route: Route
) -> None:
    async with httpx.AsyncClient(base_url=e2e.gateway, timeout=15) as gw:
        ids = await _prepare(gw, callers, kind, route, target)
        r = await gw.request(
            route.method,
            route.path.format(**ids),
            json=_body(route, ids),
            headers=callers.headers(kind, target),
        )
    want = expected(kind, route)
    assert r.headers["content-type"].startswith("application/json"), r.text
    if want == "401":
        assert r.status_code == 401, r.text
    elif want in ("403", "404"):
        assert r.status_code == int(want), r.text
    else:
        assert r.status_code not in (401, 403), r.text
        assert r.status_code < 500 or (
            route.path.startswith("/v1/billing") and r.status_code == 503
        )


class TestOwnership:
    async def test_app_b_cannot_touch_app_a_holds_or_charges_nor_book_as_a(
        self, e2e: E2E, target: str
    ) -> None:
        penora = {"X-API-Key": e2e.new_key("penora", ALL)}
        imagegene = {"X-API-Key": e2e.new_key("imagegene", ALL)}
        key = lambda: {"Idempotency-Key": uuid.uuid4().hex}  # noqa: E731
        async with httpx.AsyncClient(base_url=e2e.gateway, timeout=15) as gw:
            bal = (
                await gw.get("/v1/ledger/balance", params={"user_id": target}, headers=penora)
            ).json()["available"]
            body = {"user_id": target, "amount": 2}
            hold = await _ok(
                await gw.post("/v1/ledger/holds", json=body, headers={**penora, **key()})
            )
            hold_id = hold["hold"]["id"]
            charge = await _ok(
                await gw.post("/v1/ledger/debits", json=body, headers={**penora, **key()})
            )
            for method, path, payload in [
                ("POST", f"/v1/ledger/holds/{hold_id}/capture", {}),
                ("POST", f"/v1/ledger/holds/{hold_id}/release", {}),
                ("GET", f"/v1/ledger/holds/{hold_id}", None),
                ("POST", "/v1/ledger/refunds", {"transaction_id": charge["transaction_id"]}),
            ]:
                r = await gw.request(method, path, json=payload, headers={**imagegene, **key()})
                assert r.status_code == 403, (path, r.text)
            # Booking in another app's name.
            r = await gw.post(
                "/v1/ledger/debits",
                json={**body, "app": "penora"},
                headers={**imagegene, **key()},
            )
            assert r.status_code == 403 and r.json()["error"]["code"] == "wrong_app"
            # Nothing moved: the hold is still active, the charge unrefunded.
            h = await gw.get(f"/v1/ledger/holds/{hold_id}", headers=penora)
            assert h.status_code == 200 and h.json()["status"] == "active"
            after = (
                await gw.get("/v1/ledger/balance", params={"user_id": target}, headers=penora)
            ).json()["available"]
            assert after == bal - 4
            release = await gw.post(f"/v1/ledger/holds/{hold_id}/release", headers=penora)
            assert release.status_code == 200, release.text

    async def test_a_user_token_never_moves_money(self, e2e: E2E, target: str) -> None:
        penora = {"X-API-Key": e2e.new_key("penora", ALL)}
        token = e2e.signing.token(target, scope=" ".join(USER_SCOPES), app="penora")
        me = {"Authorization": f"Bearer {token}"}
        key = lambda: {"Idempotency-Key": uuid.uuid4().hex}  # noqa: E731
        async with httpx.AsyncClient(base_url=e2e.gateway, timeout=15) as gw:
            body = {"user_id": target, "amount": 1}
            hold = await _ok(
                await gw.post("/v1/ledger/holds", json=body, headers={**penora, **key()})
            )
            charge = await _ok(
                await gw.post("/v1/ledger/debits", json=body, headers={**penora, **key()})
            )
            before = (
                await gw.get("/v1/ledger/balance", params={"user_id": target}, headers=me)
            ).json()
            attempts = [
                ("/v1/ledger/refunds", {"transaction_id": charge["transaction_id"]}),
                ("/v1/ledger/grants", {"user_id": target, "amount": 5, "source": "promo"}),
                (f"/v1/ledger/holds/{hold['hold']['id']}/capture", {}),
                (f"/v1/ledger/holds/{hold['hold']['id']}/release", {}),
                ("/v1/ledger/debits", body),
                ("/v1/ledger/holds", body),
            ]
            for path, payload in attempts:
                r = await gw.post(path, json=payload, headers={**me, **key()})
                assert r.status_code == 403, (path, r.text)
            after = (
                await gw.get("/v1/ledger/balance", params={"user_id": target}, headers=me)
            ).json()
            assert after["available"] == before["available"]
            assert after["held"] == before["held"]


class TestFirstGrant:
    async def test_initial_credits_are_the_one_grant_under_20_retries(self, e2e: E2E) -> None:
        admin = {"X-API-Key": e2e.new_key("ops", "admin")}
        user_id = new_user_id()
        body = {"user_id": user_id, "email": f"{user_id}@x.io", "initial_credits": 7}
        async with httpx.AsyncClient(base_url=e2e.gateway, timeout=30) as gw:
            results = await asyncio.gather(
                *(gw.post("/api/unified/create-user", json=body, headers=admin) for _ in range(20))
            )
            statuses = sorted(r.status_code for r in results)
            assert statuses.count(201) == 1 and statuses.count(200) == 19, statuses

            async def granted() -> bool:
                r = await gw.get("/v1/ledger/balance", params={"user_id": user_id}, headers=admin)
                return r.status_code == 200 and r.json()["available"] > 0

            await eventually(granted)
            await asyncio.sleep(1.0)  # let the user.created event be handled too
            txs = await gw.get(
                "/v1/ledger/transactions", params={"user_id": user_id}, headers=admin
            )
            grants = [t for t in txs.json()["items"] if t["kind"] == "grant"]
            assert [(g["amount"], g["source"]) for g in grants] == [(7, "admin")], grants


class TestCrossAppAuth:
    async def test_old_clients_sso_exchange_links_the_app(self, e2e: E2E) -> None:
        user_id = new_user_id()
        partner = {"X-API-Key": e2e.new_key("partnery", ALL)}
        now = int(time.time())
        sso = jwt.encode(
            {"sub": user_id, "email": f"{user_id}@x.io", "iat": now, "exp": now + 300},
            SSO_SECRET,
            algorithm="HS256",
        )
        async with httpx.AsyncClient(base_url=e2e.gateway, timeout=15) as gw:
            # Not linked yet: the partner may not read this user.
            r = await gw.post("/api/cross-app/auth", json={"token": sso, "app": "partnery"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["success"] is True and body["user_id"] == user_id
            token = body["access_token"]

            async def my_welcome_credits() -> bool:  # user.created -> the ledger opens it
                r = await gw.get(
                    "/v1/ledger/balance",
                    params={"user_id": user_id},
                    headers={"Authorization": f"Bearer {token}"},
                )
                return r.status_code == 200 and r.json()["available"] == 50

            await eventually(my_welcome_credits)

            async def partner_sees() -> bool:
                r = await gw.get("/v1/ledger/balance", params={"user_id": user_id}, headers=partner)
                return r.status_code == 200

            await eventually(partner_sees)
            stranger = {"X-API-Key": e2e.new_key("partnerz", ALL)}
            r = await gw.get("/v1/ledger/balance", params={"user_id": user_id}, headers=stranger)
            assert r.status_code == 403 and r.json()["error"]["code"] == "user_not_linked"
            bad = await gw.post("/api/cross-app/auth", json={"token": sso + "x"})
            assert bad.status_code == 401 and bad.json()["success"] is False
