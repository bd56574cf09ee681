"""Adversarial checks of the ledger's routes as the narrowest principals (audit)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg
import httpx
import pytest

from services.kit.db import plain_url
from services.kit.testing.plugin import principal_headers
from tests.ledger.helpers import admin, app_key, balance, key


def partner(app: str = "acme") -> dict[str, str]:
    """A partner key (no `users:any`): only users linked to it."""
    return principal_headers("app", app=app, scopes=("ledger:read", "ledger:write"))


async def link(url: str, user: str, app: str) -> None:
    conn = await asyncpg.connect(plain_url(url))
    try:
        await conn.execute("INSERT INTO ledger.app_links (user_id, app) VALUES ($1, $2)", user, app)
    finally:
        await conn.close()


class TestAdminRoutesOnlyForAdmins:
    @pytest.mark.parametrize("service", ["generation", "enhancement"])
    async def test_a_service_naming_the_admin_scope_is_not_an_admin(
        self,
        ledger: httpx.AsyncClient,
        funded_user: Callable[..., Awaitable[str]],
        service: str,
    ):
        # A service signs its own principal (services/kit/principal.py): it may say
        # "I am generation", never "I am admin"; `Principal.is_admin` is false for it.
        # The scopes it lists are its own to write, so they grant nothing here.
        user = await funded_user(10)
        svc = principal_headers("service", app=service, scopes=("admin",))
        r = await ledger.get(f"/v1/ledger/admin/users/{user}", headers=svc)
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "missing_scope"
        r = await ledger.get("/v1/ledger/admin/overview", headers=svc)
        assert r.status_code == 403, r.text
        clawback = {
            "user_id": user,
            "amount": 1,
            "source": "promo",
            "grant_reference": "p",
            "reason": "test",
        }
        r = await ledger.post("/v1/ledger/admin/clawbacks", json=clawback, headers={**svc, **key()})
        assert r.status_code == 403
        # A real admin still reads them.
        r = await ledger.get(f"/v1/ledger/admin/users/{user}", headers=admin())
        assert r.status_code == 200, r.text


class TestAdminsSayWhy:
    @pytest.mark.parametrize("reason", ["   ", "\t\n"])
    async def test_initial_credits_with_a_blank_reason_are_refused(
        self, ledger: httpx.AsyncClient, new_user_id: Callable[[], str], reason: str
    ):
        # As every other admin money operation (authorize() strips the reason).
        user = new_user_id()
        r = await ledger.post(
            "/v1/ledger/accounts",
            json={"user_id": user, "welcome": False, "initial_credits": 500, "reason": reason},
            headers=admin(),
        )
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "reason_required"
        r = await ledger.get("/v1/ledger/balance", params={"user_id": user}, headers=admin())
        assert r.status_code == 404  # nothing opened, nothing granted
        r = await ledger.post(
            "/v1/ledger/accounts",
            json={"user_id": user, "initial_credits": 500, "reason": " ticket 12 "},
            headers=admin(),
        )
        assert r.status_code == 201, r.text
        assert (await balance(ledger, user))["available"] == 500


class TestBatchDenialsAreNotRemembered:
    async def test_a_denied_item_runs_again_on_the_batch_retry(
        self,
        ledger: httpx.AsyncClient,
        funded_user: Callable[..., Awaitable[str]],
        ku_database_url: str,
    ):
        # A denial (403) is about the caller, not the request: the single route does not
        # remember it under its key (docs/ledger.md "idempotency"), so neither may the
        # batch's stored answer. Here the user's `user.linked` event arrives after the
        # partner's first attempt; its retry, same Idempotency-Key, must be applied as
        # the same item sent alone would be, not replay the old 403.
        user = await funded_user(10)
        batch = {
            "operations": [
                {"op": "debit", "idempotency_key": "k1", "user_id": user, "amount": 2},
                {"op": "debit", "idempotency_key": "k2", "user_id": user, "amount": 3},
            ]
        }
        batch_key = {"Idempotency-Key": key()["Idempotency-Key"]}
        first = await ledger.post(
            "/v1/ledger/batch", json=batch, headers={**partner(), **batch_key}
        )
        assert first.status_code == 200, first.text
        assert [x["status"] for x in first.json()["results"]] == [403, 403]
        await link(ku_database_url, user, "acme")
        again = await ledger.post(
            "/v1/ledger/batch", json=batch, headers={**partner(), **batch_key}
        )
        assert again.status_code == 200, again.text
        assert [x["status"] for x in again.json()["results"]] == [201, 201], again.text
        assert (await balance(ledger, user))["available"] == 5
        # Now complete: stored, and replayed whole (nothing applies twice).
        third = await ledger.post(
            "/v1/ledger/batch", json=batch, headers={**partner(), **batch_key}
        )
        assert third.headers.get("idempotent-replayed") == "true"
        assert third.json() == again.json()
        assert (await balance(ledger, user))["available"] == 5


class TestTheWayBack:
    async def test_keys_are_per_app_and_refunds_never_exceed_the_charge(
        self,
        ledger: httpx.AsyncClient,
        funded_user: Callable[..., Awaitable[str]],
    ):
        # Two apps, one Idempotency-Key: two requests, neither replays the other's.
        user = await funded_user(10)
        shared = key()
        txs = []
        for app in ("penora", "imagegene"):
            headers = {**app_key(app), **shared}
            r = await ledger.post(
                "/v1/ledger/debits", json={"user_id": user, "amount": 3}, headers=headers
            )
            assert r.status_code == 201 and "idempotent-replayed" not in r.headers, r.text
            txs.append(r.json()["transaction_id"])
        assert (await balance(ledger, user))["available"] == 4
        # Imagegene may not refund Penora's charge, alone or in a batch.
        imagegene = app_key("imagegene")
        r = await ledger.post(
            "/v1/ledger/refunds", json={"transaction_id": txs[0]}, headers={**imagegene, **key()}
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "not_your_charge"
        # Penora's partial refunds, single and batched, with a replayed key among them:
        # never more than the charge, the replay applies nothing.
        penora = app_key("penora")
        one = key()
        r = await ledger.post(
            "/v1/ledger/refunds",
            json={"transaction_id": txs[0], "amount": 1},
            headers={**penora, **one},
        )
        assert r.status_code == 201
        items = [
            {
                "op": "refund",
                "idempotency_key": one["Idempotency-Key"],
                "transaction_id": txs[0],
                "amount": 1,
            },
            {"op": "refund", "idempotency_key": "b", "transaction_id": txs[0], "amount": 1.5},
            {"op": "refund", "idempotency_key": "c", "transaction_id": txs[0], "amount": 1},
            {"op": "refund", "idempotency_key": "d", "transaction_id": txs[0]},
            {"op": "refund", "idempotency_key": "e", "transaction_id": txs[1]},
        ]
        r = await ledger.post("/v1/ledger/batch", json={"operations": items}, headers=penora)
        results = [(x["status"], x["replayed"]) for x in r.json()["results"]]
        assert results[0] == (201, True)  # the single request's key: its replay
        assert results[4][0] == 403  # imagegene's charge
        refunded = 1 + sum(
            x["body"]["amount"] for x in r.json()["results"][1:4] if x["status"] == 201
        )
        assert refunded == 3
        assert (await balance(ledger, user))["available"] == 7
