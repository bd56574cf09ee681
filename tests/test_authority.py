"""The authority table, as a test: every mutating route of the ledger, the workspace and
billing × every kind of principal, straight at the services (in-process, the headers
signed as the gateway or a service would sign them), expecting the table's answer.

The expectation is computed from `services.kit.authority.TABLE` (the code), and
`test_docs_table_is_the_code_table` checks docs/ledger.md says the same; so the docs,
the code and the behaviour cannot drift apart. The same matrix through real gateway
processes is tests/e2e/test_authority.py.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from services.kit.authority import TABLE, Rule
from services.kit.db import plain_url
from services.kit.principal import ORIGIN_HEADER, PRINCIPAL_HEADER, Principal, sign_principal
from services.kit.testing.plugin import asgi_client

ROOT = Path(__file__).resolve().parents[1]
ALL_SCOPES = (
    "ledger:read",
    "ledger:write",
    "ledger:grant",
    "workspace:read",
    "workspace:write",
    "users:write",
)
USER_SCOPES = ("ledger:read", "workspace:read", "workspace:write", "generate", "enhance")
# Principal kinds of the matrix, and which row of the table each one reads.
KINDS = {
    "user": "user",
    "first_party": "first_party",
    "partner": "partner",  # linked to the target user
    "other_app": "partner",  # a partner the target user is NOT linked to
    "service": "service",  # generation, with the user's own token as origin
    "enhancement": "service",  # the enhancement service, the same way
    "admin": "admin",
    "none": None,
    "other_audience": None,  # a first-party principal minted for another service
    "expired": None,
}


# Which service a service kind of the matrix is.
SERVICE_OF = {"service": "generation", "enhancement": "enhancement"}


@dataclass(frozen=True)
class Route:
    service: str
    method: str
    path: str  # may contain {hold}, {charge}, {code}, {user}
    operation: str
    # The route names no user the caller must be allowed (verify: the order decides).
    userless: bool = False


ROUTES = [
    Route("ledger", "POST", "/v1/ledger/accounts", "ledger.account.open"),
    Route("ledger", "POST", "/v1/ledger/grants", "ledger.grant"),
    Route("ledger", "POST", "/v1/ledger/debits", "ledger.debit"),
    Route("ledger", "POST", "/v1/ledger/holds", "ledger.reserve"),
    Route("ledger", "POST", "/v1/ledger/holds/{hold}/capture", "ledger.capture"),
    Route("ledger", "POST", "/v1/ledger/holds/{hold}/release", "ledger.release"),
    Route("ledger", "POST", "/v1/ledger/refunds", "ledger.refund"),
    # allowances: units, not Ku (only the enhancement service moves them)
    Route("ledger", "POST", "/v1/ledger/allowances/grants", "ledger.allowance.grant"),
    Route("ledger", "POST", "/v1/ledger/allowances/draws", "ledger.allowance.draw"),
    Route(
        "ledger", "POST", "/v1/ledger/allowances/draws/{draw}/confirm", "ledger.allowance.confirm"
    ),
    Route("ledger", "POST", "/v1/ledger/allowances/draws/{draw}/return", "ledger.allowance.return"),
    Route("ledger", "GET", "/v1/ledger/allowances?user_id={user}", "ledger.allowance.read"),
    Route("workspace", "POST", "/v1/workspace/projects", "workspace.write"),
    Route("workspace", "PATCH", "/v1/workspace/projects/{code}", "workspace.write"),
    Route("workspace", "DELETE", "/v1/workspace/projects/{code}", "workspace.write"),
    Route("workspace", "PUT", "/v1/workspace/quotas/{user}", "workspace.quota"),
    Route("ledger", "PUT", "/v1/billing/catalog/topup_10", "billing.admin"),
    Route("ledger", "POST", "/v1/billing/orders", "billing.buy"),
    Route("ledger", "POST", "/v1/billing/subscriptions", "billing.buy"),
    Route("ledger", "POST", "/v1/billing/verify", "billing.buy", userless=True),
    # a read, but of everyone's payments (in aggregate): only admins and enhancement
    Route("ledger", "GET", "/v1/billing/revenue", "billing.revenue", userless=True),
]


def expected(kind: str, route: Route) -> str:
    """'401', '403', '404' or 'ok', from the table."""
    row_kind = KINDS[kind]
    if row_kind is None:
        return "401"
    rule: Rule | None = TABLE[route.operation].get(row_kind)
    if rule is None:
        return "403"
    if row_kind == "service" and SERVICE_OF[kind] not in rule.services:
        return "403"
    if kind == "other_app" and not route.userless and rule.users != "any":
        # A project looked up by code that the caller may not see is the same 404 as a
        # code that does not exist (nothing about other users' projects leaks).
        return "404" if "{code}" in route.path else "403"
    return "ok"


def _period() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


def _ref() -> str:
    return f"enhancement:{uuid.uuid4()}"


def _sign(principal: Principal, audience: str, *, issuer: str = "gateway", **kw: Any) -> str:
    return sign_principal(principal, audience=audience, issuer=issuer, **kw)


def headers_for(kind: str, audience: str, user_id: str) -> dict[str, str]:
    app = lambda name, *extra: Principal(  # noqa: E731
        kind="app", app=name, scopes=frozenset((*ALL_SCOPES, *extra))
    )
    out: dict[str, str] = {"Idempotency-Key": uuid.uuid4().hex}
    if kind == "none":
        return out
    if kind == "user":
        p = Principal(kind="user", app="penora", user_id=user_id, scopes=frozenset(USER_SCOPES))
        out[PRINCIPAL_HEADER] = _sign(p, audience)
    elif kind == "first_party":
        out[PRINCIPAL_HEADER] = _sign(app("penora", "users:any"), audience)
    elif kind == "partner":
        out[PRINCIPAL_HEADER] = _sign(app("partnerx"), audience)
    elif kind == "other_app":
        out[PRINCIPAL_HEADER] = _sign(app("otherapp"), audience)
    elif kind == "admin":
        out[PRINCIPAL_HEADER] = _sign(
            Principal(kind="app", app="ops", scopes=frozenset({"admin"})), audience
        )
    elif kind in SERVICE_OF:
        name = SERVICE_OF[kind]
        service = Principal(kind="service", app=name)
        out[PRINCIPAL_HEADER] = _sign(service, audience, issuer=name)
        user = Principal(kind="user", app="penora", user_id=user_id, scopes=frozenset(USER_SCOPES))
        out[ORIGIN_HEADER] = _sign(user, name)
    elif kind == "other_audience":
        wrong = "workspace" if audience == "ledger" else "ledger"
        out[PRINCIPAL_HEADER] = _sign(app("penora", "users:any"), wrong)
    elif kind == "expired":
        out[PRINCIPAL_HEADER] = _sign(app("penora", "users:any"), audience, now=time.time() - 600)
    return out


@pytest.fixture(scope="module")
async def clients(ku_database_url: str) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    from services.ledger.app import create_app as create_ledger
    from services.workspace.app import create_app as create_workspace

    async with (
        asgi_client(create_ledger()) as ledger,
        asgi_client(create_workspace()) as workspace,
    ):
        yield {"ledger": ledger, "workspace": workspace}


async def _ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code < 300, r.text
    return r.json()


@pytest.fixture(scope="module")
async def target(clients: dict[str, httpx.AsyncClient], ku_database_url: str) -> str:
    """A user with 1,000 Ku, linked to `partnerx` (as auth's `user.linked` would)."""
    user_id = str(10**20 + uuid.uuid4().int % (9 * 10**20))
    ledger = clients["ledger"]
    fp = lambda: headers_for("first_party", "ledger", user_id)  # noqa: E731
    await _ok(await ledger.post("/v1/ledger/accounts", json={"user_id": user_id}, headers=fp()))
    await _ok(
        await ledger.post(
            "/v1/ledger/grants",
            json={"user_id": user_id, "amount": 1000, "source": "promo"},
            headers=fp(),
        )
    )
    # An allowance for the draws of the matrix (only the enhancement service grants).
    body = {"user_id": user_id, "kind": "enhancement", "period": _period(), "units": 1000}
    await _ok(
        await ledger.post(
            "/v1/ledger/allowances/grants",
            json=body,
            headers=headers_for("enhancement", "ledger", user_id),
        )
    )
    conn = await asyncpg.connect(plain_url(ku_database_url))
    try:
        for schema in ("ledger", "workspace"):
            await conn.execute(
                f"INSERT INTO {schema}.app_links (user_id, app) VALUES ($1, 'partnerx')", user_id
            )
    finally:
        await conn.close()
    return user_id


async def _prepare(
    clients: dict[str, httpx.AsyncClient], kind: str, route: Route, user_id: str
) -> dict[str, str]:
    """The resource a route acts on, made by the caller itself when the table lets it
    (its own hold, its own charge), else by the first-party app."""
    ledger, workspace = clients["ledger"], clients["workspace"]
    maker = (
        kind
        if kind in ("first_party", "partner", "service", "enhancement", "admin")
        else "first_party"
    )
    out: dict[str, str] = {"user": user_id}
    if "{draw}" in route.path:  # drawn by the only service that draws
        drawn = {
            "user_id": user_id,
            "kind": "enhancement",
            "period": _period(),
            "reference": _ref(),
        }
        h = headers_for("enhancement", "ledger", user_id)
        r = await ledger.post("/v1/ledger/allowances/draws", json=drawn, headers=h)
        out["draw"] = (await _ok(r))["draw"]["reference"]
    if "{hold}" in route.path:
        h = headers_for(maker, "ledger", user_id)
        body = {"user_id": user_id, "amount": 1, "reason": "authority test"}
        out["hold"] = (await _ok(await ledger.post("/v1/ledger/holds", json=body, headers=h)))[
            "hold"
        ]["id"]
    if route.operation == "ledger.refund":
        refund_maker = maker if maker not in SERVICE_OF else "first_party"
        h = headers_for(refund_maker, "ledger", user_id)
        body = {"user_id": user_id, "amount": 1, "reason": "authority test"}
        charge = await _ok(await ledger.post("/v1/ledger/debits", json=body, headers=h))
        out["charge"] = str(charge["transaction_id"])
    if "{code}" in route.path:
        h = headers_for("first_party", "workspace", user_id)
        body = {"user_id": user_id, "title": "t", "content": "x", "app_source": "penora"}
        out["code"] = (
            await _ok(await workspace.post("/v1/workspace/projects", json=body, headers=h))
        )["code"]
    return out


def _body(route: Route, ids: dict[str, str]) -> dict[str, Any] | None:
    user_id = ids["user"]
    reason = {"reason": "authority test"}
    bodies: dict[str, dict[str, Any] | None] = {
        "ledger.account.open": {"user_id": str(10**20 + uuid.uuid4().int % (9 * 10**20))},
        "ledger.grant": {"user_id": user_id, "amount": 1, "source": "promo", **reason},
        "ledger.debit": {"user_id": user_id, "amount": 0.001, **reason},
        "ledger.reserve": {"user_id": user_id, "amount": 0.001, **reason},
        "ledger.capture": {"amount": 0.5, **reason},
        "ledger.release": reason,
        "ledger.refund": {"transaction_id": int(ids.get("charge", "0") or 0), **reason},
        "workspace.quota": {"limit_bytes": 2_000_000},
        "billing.revenue": None,
        "ledger.allowance.grant": {
            "user_id": user_id,
            "kind": "enhancement",
            "period": _period(),
            "units": 5,
        },
        "ledger.allowance.draw": {
            "user_id": user_id,
            "kind": "enhancement",
            "period": _period(),
            "reference": _ref(),
        },
        "ledger.allowance.confirm": None,
        "ledger.allowance.return": None,
        "ledger.allowance.read": None,
        "billing.admin": {
            "kind": "topup",
            "name": "10 Ku top-up",
            "credits": 10,
            "price": 100,
            "currency": "USD",
        },
    }
    if route.operation == "workspace.write":
        if route.method == "POST":
            return {"user_id": user_id, "title": "m", "content": "y", "app_source": "penora"}
        if route.method == "PATCH":
            return {"title": "renamed"}
        return None
    if route.operation == "billing.buy":
        if route.path.endswith("/verify"):
            return {
                "razorpay_order_id": "order_" + uuid.uuid4().hex[:14],
                "razorpay_payment_id": "pay_" + uuid.uuid4().hex[:14],
                "razorpay_signature": "0" * 64,
            }
        item = "lite_monthly" if route.path.endswith("/subscriptions") else "topup_10"
        return {"user_id": user_id, "item": item}
    return bodies[route.operation]


CASES = [(kind, route) for route in ROUTES for kind in KINDS]


@pytest.mark.parametrize(
    ("kind", "route"),
    CASES,
    ids=[f"{r.method} {r.path} as {k}" for k, r in CASES],
)
async def test_the_table_decides(
    clients: dict[str, httpx.AsyncClient], target: str, kind: str, route: Route
) -> None:
    ids = await _prepare(clients, kind, route, target)
    path = route.path.format(**ids)
    client = clients[route.service]
    audience = route.service
    body = _body(route, ids)
    r = await client.request(
        route.method,
        path,
        json=body,
        headers=headers_for(kind, audience, target),
    )
    want = expected(kind, route)
    assert r.headers["content-type"].startswith("application/json"), r.text
    if want == "401":
        assert r.status_code == 401, r.text
    elif want in ("403", "404"):
        assert r.status_code == int(want), r.text
    else:
        assert r.status_code not in (401, 403), r.text
        # Billing without Razorpay configured answers 503; nothing else may fail.
        assert r.status_code < 500 or (
            route.path.startswith("/v1/billing") and r.status_code == 503
        )


# --- the docs say the same ----------------------------------------------------------

DOC_KINDS = ("user", "first_party", "partner", "service", "admin")


def _docs_table() -> dict[str, dict[str, str]]:
    text = (ROOT / "docs" / "ledger.md").read_text()
    section = text.split("<!-- authority-table -->", 2)[1]
    rows: dict[str, dict[str, str]] = {}
    for line in section.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 1 + len(DOC_KINDS) and re.fullmatch(r"[a-z]+\.[a-z.]+", cells[0]):
            rows[cells[0]] = dict(zip(DOC_KINDS, cells[1:], strict=True))
    return rows


def _code_cell(rule: Rule | None, kind: str) -> str:
    if rule is None:
        return "—"
    if kind == "admin":
        return "any user"
    users = {
        "self": "own user",
        "any": "any user",
        "linked": "linked users",
        "origin": "the caller's user",
    }[rule.users]
    if kind == "service":
        users += " (" + ", ".join(sorted(rule.services)) + ")"
    return users


def test_docs_table_is_the_code_table() -> None:
    docs = _docs_table()
    assert set(docs) == set(TABLE), "docs/ledger.md lists other operations than the code"
    for operation, row in TABLE.items():
        for kind in DOC_KINDS:
            assert docs[operation][kind] == _code_cell(row.get(kind), kind), (operation, kind)
