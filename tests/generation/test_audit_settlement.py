"""Audit: a generation's settlement outlives the request that started it.

The settlement (capture of what was delivered, or release) runs in the response's own
task at the end of a stream (`finish_stream`) and of a non-streamed answer. A client
that leaves at that moment cancels that task: the capture must still reach the
ledger. Otherwise a streamed answer whose client disconnects as soon as it has its
`max_words` words (it knows the count) is never captured: the hold expires back to
the user, who kept every word for free.

In-process, with a ledger stand-in whose capture waits until the test lets it go.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from services.generation.catalog import Catalog
from services.generation.endpoints import run
from services.generation.providers import Message, Served
from services.generation.service import Caller, GenerationEngine, drain_background

WORDS = ["one ", "two ", "three ", "four ", "five"]


class Router:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.providers: dict[str, Any] = {}

    async def stream(
        self,
        model: Any,
        messages: Sequence[Message],
        *,
        max_words: int,
        temperature: float,
        served: list[Served],
    ) -> AsyncGenerator[str, None]:
        served.append(Served(model, "fake", False))
        for word in WORDS:
            yield word


class Billing:
    """The ledger: a capture (or release) is recorded once it has run to the end."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.go_on = asyncio.Event()
        self.settled: list[tuple[str, int]] = []

    async def hold(self, **_: Any) -> str:
        return "hold-1"

    async def settle(self, hold_id: str, cost_milli: int) -> int:
        self.entered.set()
        await self.go_on.wait()
        self.settled.append((hold_id, cost_milli))
        return cost_milli

    async def release(self, hold_id: str) -> None:
        await self.settle(hold_id, 0)


class Records:
    async def start(self, record: dict[str, Any]) -> None:
        return None

    async def finish(self, generation_id: str, values: dict[str, Any]) -> None:
        return None


def engine() -> tuple[GenerationEngine, Billing]:
    catalog = Catalog(
        [{"id": "m", "multiplier_milli": 1000}], default_provider="fake", offline=False
    )
    billing = Billing()
    e = GenerationEngine(
        catalog=catalog,
        router=Router(catalog),  # type: ignore[arg-type]
        billing=billing,  # type: ignore[arg-type]
        sessionmaker=None,  # type: ignore[arg-type]
        records=Records(),  # type: ignore[arg-type]
    )
    return e, billing


async def test_a_client_leaving_during_the_capture_is_still_charged() -> None:
    e, billing = engine()
    caller = Caller(user_id="u1", app="penora", origin=None)
    model = e.catalog.get("m")
    response = await run(
        None,  # type: ignore[arg-type]  # the request: only a save or a non-stream needs it
        e,
        caller,
        kind="text",
        model=model,
        messages=[{"role": "user", "content": "count"}],
        prompt="count",
        max_words=3,
        temperature=0.5,
        stream=True,
        save_as=None,
    )
    sent: list[bytes] = []
    leave = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message.get("body", b""))

    answering = asyncio.create_task(response({"type": "http"}, receive, send))
    # Every word is out and the capture is on its way to the ledger: the client leaves.
    await asyncio.wait_for(billing.entered.wait(), 5)
    assert b"three" in b"".join(sent)
    leave.set()
    await asyncio.wait_for(answering, 5)
    billing.go_on.set()
    await drain_background(5)
    # The three words delivered are captured (3 words at x1 = 30 milli-Ku), once.
    assert billing.settled == [("hold-1", 30)]


async def test_a_non_streamed_answer_whose_settlement_is_cancelled_still_settles() -> None:
    e, billing = engine()
    caller = Caller(user_id="u1", app="penora", origin=None)
    job = await e.start(
        caller,
        kind="text",
        model=e.catalog.get("m"),
        messages=[{"role": "user", "content": "count"}],
        prompt="count",
        max_words=3,
        temperature=0.5,
    )
    collecting = asyncio.create_task(job.collect())
    await asyncio.wait_for(billing.entered.wait(), 5)
    collecting.cancel()
    await asyncio.gather(collecting, return_exceptions=True)
    billing.go_on.set()
    await drain_background(5)
    # Settled once, whichever way (the client that left is not charged by the route;
    # the settlement itself is never cut in half, leaving the hold to its TTL).
    assert len(billing.settled) == 1
