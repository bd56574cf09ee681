"""Audit: a hold that a refund's clawback shrinks while the generation runs.

A clawback takes credit back from a lot, and from the active holds drawn from it
(docs/ledger.md "clawbacks"): the hold then holds `amount - clawed`, and a capture of
more answers 422 `capture_exceeds_hold` (stored under the capture's key for good).
Before the fix the settlement gave up on that 422: the generation was recorded at 0,
the rest of the hold went back to the user, who kept every word delivered for free (a
story failed instead, its chapter given away). Now what the hold still holds is
captured (under a key of its own), and that is what the generation or the part is
recorded at; settling again captures nothing more.

Against the real ledger, with a real clawback (the admin route) between the hold and
the settlement."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from services.generation.billing import Billing
from services.kit.config import KuSettings
from services.kit.errors import Unprocessable
from services.kit.service_client import ServiceClient
from services.kit.testing.plugin import principal_headers
from services.ledger.verify import verify
from tests.generation.conftest import Env, operator
from tests.generation.test_billing import Ledger as ScriptedLedger
from tests.generation.test_stories import follow_events, wait_for
from tests.generation.test_text import client, milli, read_sse


def user_with_lot(gen: Env, amount: int) -> tuple[str, str]:
    """A new user with one `promo` lot of `amount` Ku, and the lot's reference."""
    user = gen.funded_user(0)
    reference = f"promo-{uuid.uuid4().hex[:12]}"
    r = gen.call(
        "POST",
        f"{gen.ledger}/v1/ledger/grants",
        json={"user_id": user, "amount": amount, "source": "promo", "reference": reference},
        headers={**operator(), "Idempotency-Key": uuid.uuid4().hex},
    )
    assert r.status_code == 201, r.text
    return user, reference


def claw_back(gen: Env, user: str, reference: str, amount_milli: int) -> None:
    """An admin claws `amount_milli` back from the lot (the ledger's own route)."""
    admin = principal_headers("app", audience="ledger", app="ops", scopes=("admin",))
    r = gen.call(
        "POST",
        f"{gen.ledger}/v1/ledger/admin/clawbacks",
        json={
            "user_id": user,
            "amount": amount_milli / 1000,
            "source": "promo",
            "grant_reference": reference,
            "reason": "payment refunded (test)",
        },
        headers={**admin, "Idempotency-Key": uuid.uuid4().hex},
    )
    assert r.status_code == 201, r.text
    assert milli(r.json()["debt_added"]) == 0, r.text


async def sql(gen: Env, query: str, *args: Any) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(gen.suite.env["KU_DATABASE_URL"])
    try:
        return [dict(r) for r in await conn.fetch(query, *args)]
    finally:
        await conn.close()


async def holds(gen: Env, user: str) -> list[dict[str, Any]]:
    return await sql(
        gen,
        "SELECT id::text AS id, status, amount_milli, captured_milli, clawed_milli"
        " FROM ledger.holds WHERE user_id = $1 ORDER BY created_at",
        user,
    )


async def settle_again(gen: Env, hold_id: str, cost_milli: int) -> int:
    """The generation service's own settlement of the hold, run once more (a retry, a
    story resumed): over a client signed as the generation service."""
    service = ServiceClient(KuSettings(ledger_url=gen.ledger), me="generation")
    billing = Billing(service, hold_ttl_seconds=60)
    try:
        return await billing.settle(hold_id, cost_milli)
    finally:
        await billing.aclose()
        await service.aclose()


async def stream_150_words(
    gen: Env, user: str, meanwhile: Callable[[], Awaitable[None]]
) -> list[tuple[str | None, Any]]:
    """A 150-word stream (its hold: 200 words, 2 Ku) whose provider stalls after the first
    words: `meanwhile` runs then, with the hold active, before the rest is let through.
    The stream's events."""
    events: list[tuple[str | None, Any]] = []
    async with client(gen, user) as c:
        async with c.stream(
            "POST",
            "/v1/generation/text",
            json={
                "prompt": "#words=150 #stall_after=5",
                "model": "fake-small",
                "max_words": 200,
                "stream": True,
            },
        ) as r:
            assert r.status_code == 200
            sse = read_sse(r)
            async for event, data in sse:
                events.append((event, data))
                if event == "delta":
                    break  # words are flowing, the provider is stalled
            [hold] = await holds(gen, user)
            assert (hold["status"], hold["amount_milli"]) == ("active", 2000)  # 200 words x1
            await meanwhile()
            gen.fake.release()
            async for item in sse:
                events.append(item)
    return events


@pytest.mark.e2e
async def test_a_stream_whose_hold_is_clawed_is_charged_what_is_left(gen: Env) -> None:
    user, lot = user_with_lot(gen, 3)

    async def refund() -> None:
        # 2.5 Ku back: the lot's 1 Ku not held, then 1.5 Ku of the hold (0.5 left).
        claw_back(gen, user, lot, 2500)
        [hold] = await holds(gen, user)
        assert (hold["status"], hold["clawed_milli"]) == ("active", 1500)

    events = await stream_150_words(gen, user, refund)
    text = "".join(str(d["text"]) for e, d in events if e == "delta")
    assert len(text.split()) == 150  # every word delivered (1.5 Ku of them)
    done = next(d for e, d in events if e == "done")
    assert done["words"] == 150 and milli(done["cost"]) == 500, done
    # The ledger: the 0.5 Ku still held was captured, once; nothing came back to the user.
    [hold] = await holds(gen, user)
    assert (hold["status"], hold["captured_milli"], hold["clawed_milli"]) == (
        "captured",
        500,
        1500,
    ), hold
    balance = gen.balance(user)
    assert (milli(balance["available"]), milli(balance["held"])) == (0, 0), balance
    captures = [t for t in gen.journal(user) if t["kind"] == "capture"]
    assert [milli(t["amount"]) for t in captures] == [500]
    # The service's record says what was charged.
    [record] = await sql(
        gen,
        "SELECT cost_milli, held_milli, words, error FROM generation.generations"
        " WHERE hold_id = $1",
        hold["id"],
    )
    assert (record["cost_milli"], record["words"], record["error"]) == (500, 150, None), record
    assert await verify(gen.suite.env["KU_DATABASE_URL"]) == []
    # Settled again (same hold, same cost): the same 0.5 Ku answered, nothing captured more.
    assert await settle_again(gen, hold["id"], 1500) == 500
    [after] = await holds(gen, user)
    assert (after["status"], after["captured_milli"]) == ("captured", 500)
    assert [milli(t["amount"]) for t in gen.journal(user) if t["kind"] == "capture"] == [500]
    assert milli(gen.balance(user)["available"]) == 0


@pytest.mark.e2e
async def test_a_stream_whose_lot_expires_is_charged_what_is_capturable(gen: Env) -> None:
    """A lot the hold drew from expires during the stream: the ledger refuses the capture
    (409 `hold_partly_expired`, with what is `capturable`, stored under the key for
    good); that much is captured, the expired part goes to `expired`."""
    user, first = user_with_lot(gen, 1)
    r = gen.call(
        "POST",
        f"{gen.ledger}/v1/ledger/grants",
        json={"user_id": user, "amount": 2, "source": "promo", "reference": uuid.uuid4().hex},
        headers={**operator(), "Idempotency-Key": uuid.uuid4().hex},
    )
    assert r.status_code == 201, r.text

    async def expire() -> None:
        # The hold drew the older lot's 1 Ku first; that lot's time runs out now.
        await sql(
            gen,
            "UPDATE ledger.grants SET expires_at = now() WHERE user_id = $1 AND reference = $2",
            user,
            first,
        )

    events = await stream_150_words(gen, user, expire)
    done = next(d for e, d in events if e == "done")
    assert done["words"] == 150 and milli(done["cost"]) == 1000, done  # 1.5 asked, 1 valid
    [hold] = await holds(gen, user)
    assert (hold["status"], hold["captured_milli"]) == ("captured", 1000), hold
    assert [milli(t["amount"]) for t in gen.journal(user) if t["kind"] == "capture"] == [1000]
    # The other lot's unspent 1 Ku is the user's again; the expired lot's is gone.
    assert milli(gen.balance(user)["available"]) == 1000
    [record] = await sql(
        gen, "SELECT cost_milli FROM generation.generations WHERE hold_id = $1", hold["id"]
    )
    assert record["cost_milli"] == 1000
    assert await verify(gen.suite.env["KU_DATABASE_URL"]) == []
    assert await settle_again(gen, hold["id"], 1500) == 1000  # a rerun: nothing more
    assert [milli(t["amount"]) for t in gen.journal(user) if t["kind"] == "capture"] == [1000]


@pytest.mark.e2e
async def test_a_story_chapter_whose_hold_is_clawed_is_charged_what_is_left(gen: Env) -> None:
    user, lot = user_with_lot(gen, 2)
    token = gen.user_token(user)
    marker = uuid.uuid4().hex
    events: list[dict[str, Any]] = []
    listener = asyncio.create_task(follow_events(gen, token, events))
    await asyncio.sleep(0.5)  # the stream is open before anything happens
    gen.fake.stall_on = "Write Chapter 1 of 1"
    try:
        async with httpx.AsyncClient(
            base_url=gen.gateway, headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as c:
            r = await c.post(
                "/v1/generation/story",
                json={
                    "premise": f"A ferry {marker} #words=40",
                    "chapters": 1,
                    "words_per_chapter": 50,
                    "model": "fake-small",
                },
            )
            assert r.status_code == 202, r.text
            story_id = r.json()["id"]
            # Outline (limit 50 words) and chapter 1 (50 words) held: 0.5 Ku each.
            # This story's chapter (the fake is shared: other tests wrote chapters too).
            await wait_for(
                lambda: any(
                    "Write Chapter 1 of 1" in str(r["messages"]) for r in gen.fake.seen(marker)
                )
            )
            outline, chapter = await holds(gen, user)
            assert (outline["status"], outline["captured_milli"]) == ("captured", 400)
            assert (chapter["status"], chapter["amount_milli"]) == ("active", 500)
            # What is not held (2 - 0.4 - 0.5 = 1.1 Ku), then 0.25 Ku of chapter 1's hold.
            assert milli(gen.balance(user)["available"]) == 1100
            claw_back(gen, user, lot, 1350)
            gen.fake.release()

            def finished() -> bool:
                return any(
                    e["topic"] in ("story.completed", "story.failed") and e["story_id"] == story_id
                    for e in events
                )

            await wait_for(finished)
            r = await c.get(f"/v1/generation/story/{story_id}")
            assert r.status_code == 200, r.text
            story = r.json()
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await listener
    # Chapter 1 (40 words, 0.4 Ku) delivered: charged the 0.25 Ku its hold still held.
    assert story["status"] == "completed", story
    assert [p["status"] for p in story["parts"]] == ["charged", "charged"]
    assert [p["words"] for p in story["parts"]] == [40, 40]
    assert [milli(p["cost"]) for p in story["parts"]] == [400, 250]
    assert milli(story["cost"]) == 650
    _, chapter = await holds(gen, user)
    assert (chapter["status"], chapter["captured_milli"], chapter["clawed_milli"]) == (
        "captured",
        250,
        250,
    ), chapter
    [record] = await sql(
        gen, "SELECT cost_milli FROM generation.generations WHERE hold_id = $1", chapter["id"]
    )
    assert record["cost_milli"] == 250
    balance = gen.balance(user)
    assert (milli(balance["available"]), milli(balance["held"])) == (0, 0), balance
    captures = [milli(t["amount"]) for t in gen.journal(user) if t["kind"] == "capture"]
    assert captures == [400, 250]
    assert await verify(gen.suite.env["KU_DATABASE_URL"]) == []
    # A resumed runner settles the part again: nothing more is captured.
    assert await settle_again(gen, chapter["id"], 400) == 250
    captures = [milli(t["amount"]) for t in gen.journal(user) if t["kind"] == "capture"]
    assert captures == [400, 250]


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedLedger, Billing]]:
    """The generation's Billing against a scripted ledger on loopback (test_billing's)."""
    ledger = ScriptedLedger(script=[])
    server = await asyncio.start_server(ledger.handle, "127.0.0.1", 0)
    ledger.port = server.sockets[0].getsockname()[1]
    service = ServiceClient(
        KuSettings(ledger_url=f"http://127.0.0.1:{ledger.port}"), me="generation", retries=0
    )
    billing = Billing(service, hold_ttl_seconds=60)
    try:
        yield ledger, billing
    finally:
        await billing.aclose()
        await service.aclose()
        server.close()
        await server.wait_closed()


HOLD_ID = "4f9c2b1e-8d3a-4c6e-9f1b-2a7d5e8c0b34"


def exceeds(held: float, requested: float) -> tuple[int, object]:
    error = {
        "code": "capture_exceeds_hold",
        "message": "Cannot capture more than is held",
        "detail": {"held": held, "requested": requested},
    }
    return 422, {"error": error}


async def test_a_hold_clawed_again_between_the_two_captures_is_followed(
    scripted: tuple[ScriptedLedger, Billing],
) -> None:
    """Scripted ledger: a second clawback lands between the 422 and the capture of what
    was left. Each capture is keyed by its amount, so a rerun meets the same answers."""
    ledger, billing = scripted
    ledger.script = [exceeds(0.5, 1.5), exceeds(0.2, 0.5), (200, {"hold": {"id": HOLD_ID}})]
    assert await billing.settle(HOLD_ID, 1500) == 200
    assert [
        (s.target, s.headers["idempotency-key"], orjson.loads(s.body)) for s in ledger.seen
    ] == [
        (f"/v1/ledger/holds/{HOLD_ID}/capture", f"capture:{HOLD_ID}", {"amount": 1.5}),
        (f"/v1/ledger/holds/{HOLD_ID}/capture", f"capture:{HOLD_ID}:held:500", {"amount": 0.5}),
        (f"/v1/ledger/holds/{HOLD_ID}/capture", f"capture:{HOLD_ID}:held:200", {"amount": 0.2}),
    ]


async def test_a_hold_with_nothing_left_is_released_and_charged_nothing(
    scripted: tuple[ScriptedLedger, Billing],
) -> None:
    ledger, billing = scripted
    ledger.script = [exceeds(0, 1.5), (200, {"hold": {"id": HOLD_ID}})]
    assert await billing.settle(HOLD_ID, 1500) == 0
    assert [(s.target, s.headers["idempotency-key"]) for s in ledger.seen] == [
        (f"/v1/ledger/holds/{HOLD_ID}/capture", f"capture:{HOLD_ID}"),
        (f"/v1/ledger/holds/{HOLD_ID}/release", f"release:{HOLD_ID}"),
    ]


async def test_another_422_is_not_taken_for_a_clawback(
    scripted: tuple[ScriptedLedger, Billing],
) -> None:
    ledger, billing = scripted
    ledger.script = [(422, {"error": {"code": "validation_error", "message": "No"}})]
    with pytest.raises(Unprocessable):
        await billing.settle(HOLD_ID, 1500)
    assert len(ledger.seen) == 1
