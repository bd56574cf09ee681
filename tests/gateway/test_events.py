"""`GET /v1/events`: a user's credits.changed, live and resumed."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from services.kit.testing.plugin import principal_headers
from tests.gateway.conftest import Served, Stack
from tests.gateway.helpers import new_user_id


async def open_account(stack: Stack) -> str:
    user_id = new_user_id()
    r = await stack.ledger.post(
        "/v1/ledger/accounts",
        json={"user_id": user_id, "welcome": True},
        headers=principal_headers("app", audience="ledger", app="ops", scopes=("admin",)),
    )
    assert r.status_code == 201
    return user_id


async def spend(stack: Stack, user_id: str, amount: float) -> None:
    r = await stack.ledger.post(
        "/v1/ledger/debits",
        json={"user_id": user_id, "amount": amount, "app": "penora", "reference": new_user_id()},
        headers=principal_headers(
            "app", audience="ledger", app="penora", scopes=("ledger:write", "users:any")
        ),
    )
    assert r.status_code == 201, r.text


async def read_events(
    response: httpx.Response, count: int, skip_welcome: bool = True
) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    async for line in response.aiter_lines():
        if line.startswith("id: "):
            current["id"] = line[4:]
        elif line.startswith("event: "):
            current["event"] = line[7:]
        elif line.startswith("data: "):
            current["data"] = orjson.loads(line[6:])
        elif line == "" and current:
            # The welcome grant's event may still be in flight when a test subscribes.
            if not (skip_welcome and current.get("data", {}).get("reason") == "grant:welcome"):
                events.append(current)
            current = {}
            if len(events) == count:
                return events
    return events


class TestCreditsChanged:
    async def test_live_within_a_second_then_resume(self, gw: httpx.AsyncClient, stack: Stack):
        user_id = await open_account(stack)
        other = await open_account(stack)
        auth = {"Authorization": f"Bearer {stack.signing.token(user_id)}"}
        async with gw.stream("GET", "/v1/events", headers=auth) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            await asyncio.sleep(0.2)
            start = time.monotonic()
            await spend(stack, other, 1)  # not ours: never delivered
            await spend(stack, user_id, 2.5)
            [event] = await asyncio.wait_for(read_events(r, 1), timeout=3)
            assert time.monotonic() - start < 1.0
        assert event["event"] == "credits.changed"
        data = event["data"]
        assert data["user_id"] == user_id
        assert data["available"] == 47.5 and data["delta"] == -2.5 and data["app"] == "penora"

        await spend(stack, user_id, 1)
        await spend(stack, user_id, 2)
        resumed = {**auth, "Last-Event-ID": event["id"]}
        async with gw.stream("GET", "/v1/events", headers=resumed) as r:
            missed = await asyncio.wait_for(read_events(r, 2), timeout=3)
        assert [e["data"]["delta"] for e in missed] == [-1, -2]
        assert missed[-1]["data"]["available"] == 44.5

    async def test_app_key_needs_user_and_user_token_only_self(
        self, gw: httpx.AsyncClient, stack: Stack, app_key: str
    ):
        me, other = await open_account(stack), await open_account(stack)
        r = await gw.get("/v1/events", headers={"X-API-Key": app_key})
        assert r.status_code == 400
        auth = {"Authorization": f"Bearer {stack.signing.token(me)}"}
        r = await gw.get("/v1/events", params={"user_id": other}, headers=auth)
        assert r.status_code == 403
        r = await gw.get("/v1/events")
        assert r.status_code == 401


async def spend_batch(stack: Stack, debits: list[tuple[str, float]]) -> None:
    """Debits in ONE ledger batch: one outbox row, so one stream entry holding them all."""
    operations = [
        {"op": "debit", "idempotency_key": uuid.uuid4().hex, "user_id": u, "amount": amount}
        for u, amount in debits
    ]
    r = await stack.ledger.post(
        "/v1/ledger/batch",
        json={"operations": operations},
        headers=principal_headers(
            "app", audience="ledger", app="penora", scopes=("ledger:write", "users:any")
        ),
    )
    assert r.status_code == 200, r.text
    assert all(res["status"] == 201 for res in r.json()["results"]), r.text


class TestBatchedEvents:
    """A ledger batch is one stream entry (services/kit/outbox.py): the hub unpacks it
    and gives each user its own events, each with its own id (`<entry id>.<i>`)."""

    async def test_each_user_gets_its_events_of_a_batch_and_resumes_inside_it(
        self, gw: httpx.AsyncClient, stack: Stack
    ):
        me, other = await open_account(stack), await open_account(stack)
        mine = {"Authorization": f"Bearer {stack.signing.token(me)}"}
        theirs = {"Authorization": f"Bearer {stack.signing.token(other)}"}
        async with (
            gw.stream("GET", "/v1/events", headers=mine) as r_me,
            gw.stream("GET", "/v1/events", headers=theirs) as r_other,
        ):
            await asyncio.sleep(0.2)
            await spend_batch(stack, [(me, 1), (other, 2), (me, 3)])
            got = await asyncio.wait_for(read_events(r_me, 2), timeout=3)
            [their] = await asyncio.wait_for(read_events(r_other, 1), timeout=3)
        assert {e["data"]["user_id"] for e in got} == {me}
        assert sorted(e["data"]["delta"] for e in got) == [-3, -1]
        assert their["data"]["user_id"] == other and their["data"]["delta"] == -2
        entries = {e["id"].partition(".")[0] for e in [*got, their]}
        assert len(entries) == 1  # one entry: the batch
        positions = sorted(int(e["id"].partition(".")[2]) for e in [*got, their])
        assert positions == [0, 1, 2]

        # Resuming from the first of my events gives the second (same entry), then
        # what came after; resuming from the entry's id (a client from before
        # batching) skips the whole entry.
        await spend(stack, me, 0.5)
        resumed = {**mine, "Last-Event-ID": got[0]["id"]}
        async with gw.stream("GET", "/v1/events", headers=resumed) as r:
            missed = await asyncio.wait_for(read_events(r, 2), timeout=3)
        assert [e["id"] for e in missed[:1]] == [got[1]["id"]]
        assert missed[1]["data"]["delta"] == -0.5
        whole = {**mine, "Last-Event-ID": entries.pop()}
        async with gw.stream("GET", "/v1/events", headers=whole) as r:
            [after] = await asyncio.wait_for(read_events(r, 1), timeout=3)
        assert after["data"]["delta"] == -0.5

    async def test_an_unsigned_or_forged_entry_reaches_nobody(
        self, gw: httpx.AsyncClient, stack: Stack
    ):
        from services.kit.outbox import signed_fields, stream_name

        me = await open_account(stack)
        forged = orjson.dumps(
            [{"user_id": me, "available_milli": 10**9, "delta_milli": 10**9, "reason": "forged"}]
            * 2
        ).decode()
        single = orjson.dumps({"user_id": me, "delta_milli": 10**9, "reason": "forged"}).decode()
        signed = signed_fields("ledger", str(uuid.uuid4()), "credits.changed", forged)
        ledger_stream = stream_name(os.environ["KU_BUS_PREFIX"], "ledger")
        redis = Redis.from_url(os.environ["KU_REDIS_URL"])
        auth = {"Authorization": f"Bearer {stack.signing.token(me)}"}
        try:
            async with gw.stream("GET", "/v1/events", headers=auth) as r:
                await asyncio.sleep(0.2)
                newest = await redis.xrevrange(ledger_stream, count=1)
                last = newest[0][0].decode() if newest else "0-0"
                for fields in (
                    {k: v for k, v in signed.items() if k not in ("sig", "issuer")},
                    dict(signed, payload=forged.replace("forged", "forgeD")),  # tampered
                    signed_fields("auth", str(uuid.uuid4()), "credits.changed", forged),
                    signed_fields("workspace", str(uuid.uuid4()), "credits.changed", single),
                ):
                    await redis.xadd(ledger_stream, fields)
                await spend(stack, me, 1)
                [event] = await asyncio.wait_for(read_events(r, 1), timeout=3)
            assert event["data"]["reason"] == "debit" and event["data"]["delta"] == -1
            # Nor does a resume replay them.
            await spend(stack, me, 2)
            resumed = {**auth, "Last-Event-ID": last}  # before the forged ones
            async with gw.stream("GET", "/v1/events", headers=resumed) as r:
                missed = await asyncio.wait_for(read_events(r, 2), timeout=3)
            assert [e["data"]["reason"] for e in missed] == ["debit", "debit"]
            assert [e["data"]["delta"] for e in missed] == [-1, -2]
        finally:
            await redis.aclose()


def bearer(stack: Stack, user_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.signing.token(user_id)}"}


async def new_ticket(gw: httpx.AsyncClient, stack: Stack, user_id: str) -> str:
    r = await gw.post("/v1/events/tickets", headers=bearer(stack, user_id))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["user_id"] == user_id and body["url"] == f"/v1/events?ticket={body['ticket']}"
    return str(body["ticket"])


@pytest.fixture(scope="module")
async def cors_gw(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """A second gateway (same Redis) that allows one frontend origin."""
    from gateway.app import create_app

    settings = stack.gateway_settings(cors_origins="https://penora.example")
    async with Served(create_app(settings)) as served:
        async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
            yield client


class TestTickets:
    async def test_a_ticket_opens_its_users_stream_once(self, gw: httpx.AsyncClient, stack: Stack):
        user_id = await open_account(stack)
        r = await gw.post("/v1/events/tickets", headers=bearer(stack, user_id))
        assert r.status_code == 201 and r.json()["expires_in"] == 60
        ticket = r.json()["ticket"]
        async with gw.stream("GET", "/v1/events", params={"ticket": ticket}) as stream:
            assert stream.status_code == 200
            await asyncio.sleep(0.2)
            await spend(stack, user_id, 1.5)
            [event] = await asyncio.wait_for(read_events(stream, 1), timeout=5)
        assert event["data"]["user_id"] == user_id and event["data"]["delta"] == -1.5
        # Used: a reconnect with the same ticket is refused (get a new one).
        again = await gw.get("/v1/events", params={"ticket": ticket})
        assert again.status_code == 401
        assert again.json()["error"]["code"] == "invalid_ticket"
        # A new ticket resumes after the last id seen (EventSource cannot set the header).
        await spend(stack, user_id, 2)
        fresh = await new_ticket(gw, stack, user_id)
        params = {"ticket": fresh, "last_event_id": event["id"]}
        async with gw.stream("GET", "/v1/events", params=params) as stream:
            [missed] = await asyncio.wait_for(read_events(stream, 1), timeout=5)
        assert missed["data"]["delta"] == -2

    async def test_used_on_another_gateway_instance_is_used_everywhere(
        self, gw: httpx.AsyncClient, cors_gw: httpx.AsyncClient, stack: Stack
    ):
        user_id = await open_account(stack)
        ticket = await new_ticket(gw, stack, user_id)
        async with cors_gw.stream("GET", "/v1/events", params={"ticket": ticket}) as stream:
            assert stream.status_code == 200
        r = await gw.get("/v1/events", params={"ticket": ticket})
        assert r.status_code == 401

    async def test_expires(self, stack: Stack):
        from gateway.app import create_app

        user_id = await open_account(stack)
        settings = stack.gateway_settings(gateway_events_ticket_seconds=1)
        async with Served(create_app(settings)) as served:
            async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
                r = await client.post("/v1/events/tickets", headers=bearer(stack, user_id))
                assert r.status_code == 201 and r.json()["expires_in"] == 1
                await asyncio.sleep(1.5)  # Redis drops the key after its 1 s TTL
                late = await client.get("/v1/events", params={"ticket": r.json()["ticket"]})
        assert late.status_code == 401
        assert late.json()["error"]["code"] == "invalid_ticket"

    async def test_bound_to_its_user(self, gw: httpx.AsyncClient, stack: Stack):
        me, other = await open_account(stack), await open_account(stack)
        ticket = await new_ticket(gw, stack, me)
        r = await gw.get("/v1/events", params={"ticket": ticket, "user_id": other})
        assert r.status_code == 403 and r.json()["error"]["code"] == "wrong_user"

    async def test_only_for_user_tokens(self, gw: httpx.AsyncClient, stack: Stack, app_key: str):
        r = await gw.post("/v1/events/tickets", headers={"X-API-Key": app_key})
        assert r.status_code == 403 and r.json()["error"]["code"] == "user_token_required"
        r = await gw.post("/v1/events/tickets")
        assert r.status_code == 401

    async def test_refused_everywhere_else(self, gw: httpx.AsyncClient, stack: Stack):
        user_id = await open_account(stack)
        ticket = await new_ticket(gw, stack, user_id)
        balance = {"user_id": user_id}
        attempts = [
            ("GET", "/v1/ledger/balance", balance, {"Authorization": f"Bearer {ticket}"}),
            ("GET", "/v1/ledger/balance", balance, {"X-API-Key": ticket}),
            ("GET", "/v1/ledger/balance", {**balance, "ticket": ticket}, {}),
            ("GET", "/api/unified/user-info", {**balance, "ticket": ticket}, {}),
            ("POST", "/v1/events/tickets", {}, {"Authorization": f"Bearer {ticket}"}),
            ("POST", "/v1/events/tickets", {"ticket": ticket}, {}),
            ("GET", "/v1/events", {}, {"Authorization": f"Bearer {ticket}"}),
        ]
        for method, path, params, headers in attempts:
            r = await gw.request(method, path, params=params, headers=headers)
            assert r.status_code == 401, (path, headers, r.text)
        # Not a credential together with one either.
        both = {"ticket": ticket}
        r = await gw.get("/v1/events", params=both, headers=bearer(stack, user_id))
        assert r.status_code == 400 and r.json()["error"]["code"] == "ambiguous_credentials"
        # None of that used it up: the stream still opens, once.
        async with gw.stream("GET", "/v1/events", params={"ticket": ticket}) as stream:
            assert stream.status_code == 200

    async def test_cors_allows_only_configured_origins(
        self, gw: httpx.AsyncClient, cors_gw: httpx.AsyncClient, stack: Stack
    ):
        preflight = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        }
        ok = await cors_gw.options(
            "/v1/events/tickets", headers={**preflight, "Origin": "https://penora.example"}
        )
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "https://penora.example"
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        evil = await cors_gw.options(
            "/v1/events/tickets", headers={**preflight, "Origin": "https://evil.example"}
        )
        assert evil.status_code == 400
        assert "access-control-allow-origin" not in evil.headers
        # No origins configured: no CORS at all.
        none = await gw.options(
            "/v1/events/tickets", headers={**preflight, "Origin": "https://penora.example"}
        )
        assert "access-control-allow-origin" not in none.headers

        user_id = await open_account(stack)
        for origin, allowed in (("https://penora.example", True), ("https://evil.example", False)):
            ticket = await new_ticket(cors_gw, stack, user_id)
            params = {"ticket": ticket}
            headers = {"Origin": origin}
            async with cors_gw.stream("GET", "/v1/events", params=params, headers=headers) as r:
                assert r.status_code == 200
                got = r.headers.get("access-control-allow-origin")
            # A browser reads the stream only with the header naming its origin.
            assert got == (origin if allowed else None)


class TestIdleHub:
    """With nobody subscribed the hub reads only the auth stream (revocations): the
    ledger's entries cost it nothing. A subscriber activates the other streams from
    their newest entry, so it gets every event after it subscribed and none before."""

    async def test_reads_only_auth_until_a_subscriber_then_what_follows(self):
        from gateway.events import EventHub
        from services.kit.outbox import signed_fields, stream_name

        redis = Redis.from_url(os.environ["KU_REDIS_URL"])
        prefix = f"{os.environ['KU_BUS_PREFIX']}.hub{uuid.uuid4().hex[:6]}"
        ledger, auth = stream_name(prefix, "ledger"), stream_name(prefix, "auth")
        read: list[set[str]] = []
        xread = redis.xread

        async def noting(streams: dict[Any, Any], **kwargs: Any) -> Any:
            read.append({_text(s) for s in streams})
            return await xread(streams, **kwargs)

        redis.xread = noting
        revoked: list[str] = []
        hub = EventHub(redis, prefix, revoked.append)
        user = new_user_id()

        def credits(*deltas: int) -> dict[str, Any]:
            body = [{"user_id": user, "delta_milli": d} for d in deltas]
            payload = orjson.dumps(body if len(body) > 1 else body[0]).decode()
            return signed_fields("ledger", str(uuid.uuid4()), "credits.changed", payload)

        hub.start()
        try:
            await asyncio.wait_for(hub.ready.wait(), 5)
            await redis.xadd(ledger, credits(-1))  # before anyone subscribed
            revocation = orjson.dumps({"prefix": "ku_old", "app": "penora"}).decode()
            await redis.xadd(auth, signed_fields("auth", "rev-1", "key.revoked", revocation))
            for _ in range(100):
                if revoked:
                    break
                await asyncio.sleep(0.02)
            assert revoked == ["ku_old"]  # idle, the hub still acts on revocations
            assert read and all(streams == {auth} for streams in read)

            queue = hub.subscribe(user)
            await hub.activate()
            entry = _text(await redis.xadd(ledger, credits(-2, -3)))
            got = [await asyncio.wait_for(queue.get(), 5) for _ in range(2)]
            assert [(i, p["delta_milli"]) for i, _, p in got] == [
                (f"{entry}.0", -2),
                (f"{entry}.1", -3),
            ]
            assert queue.empty()  # the event from before the subscription never came
            assert ledger in read[-1]

            hub.unsubscribe(user, queue)
            await asyncio.sleep(1.2)  # the active read's block ends; the hub goes idle
            before = len(read)
            await redis.xadd(ledger, credits(-4))
            await asyncio.sleep(0.5)
            assert all(streams == {auth} for streams in read[before:])
        finally:
            await hub.stop()
            await redis.delete(ledger, auth)
            await redis.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
