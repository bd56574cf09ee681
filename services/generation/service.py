"""One generation, start to end: hold the maximum, generate, capture what was
delivered, release the rest.

    job = await engine.start(caller, model=..., max_words=...)  # 402 here, before any provider
    result = await job.collect()          # or: async for delta in job.stream(): ...

Money rules, each decided here:
- the hold covers `max_words` at the dearest model of the fallback chain, so whoever
  answers, the capture fits in it;
- the words charged are the words delivered: never more than `max_words` (output is
  cut there), and for a stream, only what was handed to the client before it left;
- the price is the serving model's (a fallback is charged at its own multiplier);
- a provider failure or timeout before any text releases the hold in full.

No provider or ledger call runs inside a database transaction: rows are written in
short units of work before and after.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Histogram
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.generation.billing import Billing
from services.generation.catalog import Catalog, Model, count_words, first_words
from services.generation.models import Generation
from services.generation.providers import Message, ProviderError, Router, Served
from services.generation.records import Records
from services.kit.db import unit_of_work
from services.kit.errors import KuError, UpstreamError

log = logging.getLogger("ku.generation")

GENERATIONS = Counter(
    "ku_generation_requests_total",
    "Generations by requested model, serving model, provider and outcome",
    ["model", "provider", "status"],
)
WORDS = Counter("ku_generation_words_total", "Words delivered (and charged)", ["model", "provider"])
CHARGED = Counter("ku_generation_charged_milli_total", "milli-Ku captured", ["model", "provider"])
DURATION = Histogram(
    "ku_generation_seconds",
    "Generation time, start to settlement",
    ["model", "provider"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120),
)
FIRST_TOKEN = Histogram(
    "ku_generation_first_token_seconds",
    "Time to the first delta from the provider",
    ["model", "provider"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

# Settlements started from a cancelled stream must outlive it: keep a reference.
_BACKGROUND: set[asyncio.Task[Any]] = set()


def in_background(coro: Any) -> None:
    task = asyncio.create_task(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


async def drain_background(seconds: float = 10.0) -> None:
    if _BACKGROUND:
        await asyncio.wait(set(_BACKGROUND), timeout=seconds)


@dataclass(frozen=True)
class Caller:
    user_id: str
    # The lane the spend is booked in: the app the user came through.
    app: str
    # The caller's signed principal header, forwarded to the ledger with the hold.
    origin: str | None


@dataclass
class Outcome:
    id: str
    text: str
    words: int
    cost_milli: int
    held_milli: int
    model: str
    served_model: str
    provider: str | None
    offline: bool
    status: str
    finish_reason: str
    latency_ms: int
    error: KuError | None = None


class _Cutter:
    """Deltas cut at exactly `limit` words, counting as they pass."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.words = 0
        self.ends_in_word = False
        self.full = False

    def take(self, delta: str) -> str:
        if self.full or not delta:
            return ""
        tokens = len(delta.split())
        # A delta that starts inside the last word continues it: not a new word.
        joins = self.ends_in_word and not delta[0].isspace()
        added = tokens - (1 if joins and tokens else 0)
        # At exactly the limit the last word may still go on in the next delta; the cut
        # comes when a word past the limit starts.
        if self.words + added > self.limit:
            keep = self.limit - self.words + (1 if joins else 0)
            delta = first_words(delta, keep) if keep > 0 else ""
            added = self.limit - self.words
            self.full = True
        self.words += added
        if delta:
            self.ends_in_word = not delta[-1].isspace()
        return delta


@dataclass
class Job:
    engine: GenerationEngine
    id: str
    caller: Caller
    kind: str
    model: Model
    messages: Sequence[Message]
    max_words: int
    temperature: float
    hold_id: str
    held_milli: int
    started: float = field(default_factory=time.monotonic)
    served: list[Served] = field(default_factory=list)
    settled: Outcome | None = None
    error: KuError | None = None
    # How `stream()` ended: (text delivered, finished, error, cut at max_words).
    ended: tuple[str, bool, KuError | None, bool] | None = None
    # The generation's row, inserted once the first words are out (`_record`: after the
    # first chunk went to the client, or settlement, whichever comes first).
    record: dict[str, Any] | None = None
    recorded: asyncio.Task[None] | None = None
    # The settlement, once started (`settle`): shielded from the caller's cancellation.
    settling: asyncio.Task[Outcome] | None = None

    def _record(self) -> asyncio.Task[None] | None:
        if self.recorded is None and self.record is not None:
            self.recorded = asyncio.create_task(self.engine.record_start(self.record))
        return self.recorded

    async def _deltas(self, cutter: _Cutter) -> AsyncIterator[str]:
        first = True
        async for delta in self.engine.router.stream(
            self.model,
            self.messages,
            max_words=self.max_words,
            temperature=self.temperature,
            served=self.served,
        ):
            if first and self.served:
                s = self.served[0]
                FIRST_TOKEN.labels(s.model.id, s.provider).observe(time.monotonic() - self.started)
            piece = cutter.take(delta)
            if piece:
                yield piece
            first = False
            if cutter.full:
                return

    async def collect(self) -> Outcome:
        """Generate to the end (non-streamed). Failure before any text: released, raised."""
        cutter = _Cutter(self.max_words)
        parts: list[str] = []
        try:
            async for piece in self._deltas(cutter):
                parts.append(piece)
                self._record()
        except (KuError, ProviderError) as exc:
            # Nothing reaches a non-streamed client unless it all arrives: pay nothing.
            outcome = await self.settle("", error=_as_ku(exc))
            raise outcome.error or _as_ku(exc) from None
        except BaseException:
            in_background(self.settle("", error=UpstreamError("interrupted")))
            raise
        return await self.settle("".join(parts), length=cutter.full)

    async def stream(self) -> AsyncGenerator[str, None]:
        """Deltas for a streamed response. Whatever was yielded before the consumer
        stopped (finished, failed or left) is what the user is charged for.

        The provider is read in the consumer's own task, one hop per piece (no task or
        queue in between: each cost a wake-up per piece). A client that leaves while
        the provider is silent is still noticed at once: the response's task is
        cancelled, and the cancellation comes out of the provider's read through here.
        The settlement then runs in its own task, outside the cancelled response."""
        cutter = _Cutter(self.max_words)
        deltas = self.engine.router.stream(
            self.model,
            self.messages,
            max_words=self.max_words,
            temperature=self.temperature,
            served=self.served,
        )
        delivered: list[str] = []
        finished = False
        first = True
        try:
            try:
                async for delta in deltas:
                    if first:
                        first = False
                        if self.served:
                            s = self.served[0]
                            FIRST_TOKEN.labels(s.model.id, s.provider).observe(
                                time.monotonic() - self.started
                            )
                    piece = cutter.take(delta)
                    if piece:
                        yield piece
                        delivered.append(piece)
                        # The row is written once the first words are out: here, when
                        # the consumer asks for more after sending them, not before (an
                        # INSERT's CPU on the first token's path was ~0.5 ms of time to
                        # first token).
                        self._record()
                    if cutter.full:
                        break
                finished = True
            except (KuError, ProviderError) as exc:
                self.error = _as_ku(exc)
        finally:
            # The provider's generator, left at a yield by a consumer that stopped here
            # (or cut at max_words), closes its connection now (no await inside).
            await deltas.aclose()
            text = "".join(delivered)
            self.ended = (text, finished, self.error, cutter.full)
            if not finished and self.error is None:
                # The consumer left: settle on what it got, outside its cancelled task.
                # (Otherwise the caller settles via finish_stream() and reports the cost.)
                in_background(self.settle(text, cancelled=True, length=False))

    async def finish_stream(self) -> Outcome:
        """After `stream()` ended by itself: settle on what was delivered."""
        assert self.ended is not None, "stream() has not ended"
        text, finished, error, length = self.ended
        if finished:
            return await self.settle(text, length=length)
        return await self.settle(text, error=error)

    async def settle(
        self,
        text: str,
        *,
        error: KuError | None = None,
        cancelled: bool = False,
        length: bool = False,
    ) -> Outcome:
        """Capture or release, once. It runs in a task of its own, shielded from the
        caller's cancellation: a client that leaves while the capture is on its way
        to the ledger (e.g. as soon as it has its `max_words` words) cancels the
        response's task, not the settlement, which would otherwise leave the hold to
        expire back to the user with every word delivered for free."""
        if self.settling is None:
            self.settling = asyncio.create_task(
                self._settle(text, error=error, cancelled=cancelled, length=length)
            )
            _BACKGROUND.add(self.settling)
            self.settling.add_done_callback(_BACKGROUND.discard)
        return await asyncio.shield(self.settling)

    async def _settle(
        self,
        text: str,
        *,
        error: KuError | None,
        cancelled: bool,
        length: bool,
    ) -> Outcome:
        if self.settled is not None:
            return self.settled
        served = self.served[0] if self.served else None
        model = served.model if served else self.model
        words = count_words(text)
        cost = model.price_milli(words)
        if cost > self.held_milli:  # cannot happen (hold = max over the chain); never overcharge
            log.error("generation %s: cost %s above hold %s", self.id, cost, self.held_milli)
            cost = self.held_milli
        if error is not None and words == 0:
            status = "failed"
        elif cancelled:
            status = "cancelled"
        elif error is not None:
            status = "partial"
        else:
            status = "completed"
        settle_error: str | None = None
        try:
            # What was captured: less than the cost when a clawback shrank the hold.
            cost = await self.engine.billing.settle(self.hold_id, cost)
        except KuError as exc:
            # The hold expires by itself: the user is never charged twice, at worst not at all.
            log.error("generation %s: settling hold %s failed: %s", self.id, self.hold_id, exc)
            settle_error = f"settlement failed: {exc.code}"
            cost = 0
        latency_ms = int((time.monotonic() - self.started) * 1000)
        provider = served.provider if served else None
        outcome = Outcome(
            id=self.id,
            text=text,
            words=words,
            cost_milli=cost,
            held_milli=self.held_milli,
            model=self.model.id,
            served_model=model.id,
            provider=provider,
            offline=bool(served and served.offline),
            status=status,
            finish_reason="length" if length else "stop",
            latency_ms=latency_ms,
            error=error,
        )
        self.settled = outcome
        recorded = self._record()
        if recorded is not None:
            await asyncio.gather(recorded, return_exceptions=True)
        await self.engine.record_outcome(
            outcome, error=settle_error or (error.code if error is not None else None)
        )
        label_provider = provider or "none"
        GENERATIONS.labels(model.id, label_provider, status).inc()
        if words:
            WORDS.labels(model.id, label_provider).inc(words)
            CHARGED.labels(model.id, label_provider).inc(cost)
        DURATION.labels(model.id, label_provider).observe(latency_ms / 1000)
        return outcome


def _as_ku(exc: BaseException) -> KuError:
    if isinstance(exc, KuError):
        return exc
    if isinstance(exc, ProviderError):
        return UpstreamError("The model provider failed mid-answer", code="provider_error")
    return UpstreamError("Generation failed", code="provider_error")


class GenerationEngine:
    def __init__(
        self,
        *,
        catalog: Catalog,
        router: Router,
        billing: Billing,
        sessionmaker: async_sessionmaker[AsyncSession],
        records: Records,
    ) -> None:
        self.catalog = catalog
        self.router = router
        self.billing = billing
        self.sessionmaker = sessionmaker
        self.records = records

    async def start(
        self,
        caller: Caller,
        *,
        kind: str,
        model: Model,
        messages: Sequence[Message],
        prompt: str,
        max_words: int,
        temperature: float,
    ) -> Job:
        """Hold the maximum (402 here, before any provider call) and record the generation."""
        generation_id = str(uuid.uuid4())
        held = self.catalog.max_price_milli(model, max_words)
        hold_id = await self.billing.hold(
            user_id=caller.user_id,
            app=caller.app,
            amount_milli=held,
            reference=f"generation:{generation_id}",
            description=f"{kind} with {model.id}, up to {max_words} words",
            origin=caller.origin,
        )
        # The record is written once the first words are out (off the time to first
        # token); settlement waits for it before updating it.
        record = {
            "id": uuid.UUID(generation_id),
            "user_id": caller.user_id,
            "app": caller.app,
            "kind": kind,
            "model": model.id,
            "prompt": prompt,
            "max_words": max_words,
            "held_milli": held,
            "hold_id": hold_id,
            "status": "running",
        }
        return Job(
            engine=self,
            id=generation_id,
            caller=caller,
            kind=kind,
            model=model,
            messages=messages,
            max_words=max_words,
            temperature=temperature,
            hold_id=hold_id,
            held_milli=held,
            record=record,
        )

    async def record_start(self, record: dict[str, Any]) -> None:
        await self.records.start(record)

    async def record_outcome(self, outcome: Outcome, *, error: str | None) -> None:
        await self.records.finish(
            outcome.id,
            {
                "status": outcome.status,
                "served_model": outcome.served_model if outcome.provider else None,
                "provider": outcome.provider,
                "offline": outcome.offline,
                "output": outcome.text,
                "words": outcome.words,
                "cost_milli": outcome.cost_milli,
                "latency_ms": outcome.latency_ms,
                "error": error,
            },
        )

    async def set_project(self, generation_id: str, code: str) -> None:
        async with unit_of_work(self.sessionmaker) as session:
            await session.execute(
                update(Generation)
                .where(Generation.id == uuid.UUID(generation_id))
                .values(project_code=code)
            )
