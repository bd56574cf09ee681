"""Multi-chapter stories: an outline (part 0), then chapters 1..n, each charged on its
own, with a progress event per part on the user's `/v1/events` stream.

Submit holds every part up front with the caller's principal (so a story the user
cannot pay for is refused with 402 before any provider call, and no later step needs
the caller's short-lived principal). A runner then works through the parts:

    held --generate--> generated (text stored) --capture--> charged (+ story.progress event)

The runner owns the story through a lease it renews. If the process dies, the lease
runs out and any generation process takes the story over (`StoryRunner.claim`) and
resumes at the first part not charged: a `generated` part is captured (idempotent by
hold id), a `charged` part is never generated or charged again. A part that fails
releases its hold and every later one: the user pays for the finished parts only.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import exists, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.generation.billing import Billing
from services.generation.catalog import Catalog, Model, count_words
from services.generation.models import Generation, Story, StoryPart, outbox
from services.generation.providers import Message, ProviderError, Router, Served
from services.generation.service import Caller, _Cutter
from services.kit.background import BackgroundLoop
from services.kit.db import unit_of_work
from services.kit.errors import (
    KuError,
    PaymentRequired,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from services.kit.outbox import emit

log = logging.getLogger("ku.generation.stories")

# The ledger's answers that say "not now" rather than "no": a capture is tried again.
UNREACHABLE = (UpstreamError, UpstreamTimeout, ServiceUnavailable)

SYSTEM = "You are Penora, a novelist. Write vivid, coherent fiction. Answer with the text only."


def outline_words(chapters: int) -> int:
    """The outline's length limit: a title line and about 30 words per chapter."""
    return 20 + 30 * chapters


def outline_messages(story: Story) -> list[Message]:
    return [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": (
                f"Outline a {story.chapters}-chapter story from this premise. First line: a "
                f"title. Then one line per chapter, 'Chapter k: what happens'.\n\n"
                f"Premise: {story.premise}"
            ),
        },
    ]


def chapter_messages(story: Story, n: int, outline: str, previous: str | None) -> list[Message]:
    recap = ""
    if previous:
        tail = " ".join(previous.split()[-120:])
        recap = f"\n\nThe previous chapter ended:\n{tail}"
    return [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": (
                f"Premise: {story.premise}\n\nOutline:\n{outline}{recap}\n\n"
                f"Write Chapter {n} of {story.chapters} in about {story.words_per_chapter} "
                "words. Do not repeat earlier chapters."
            ),
        },
    ]


class Stories:
    def __init__(
        self,
        *,
        catalog: Catalog,
        router: Router,
        billing: Billing,
        sessionmaker: async_sessionmaker[AsyncSession],
        lease_seconds: float,
        hold_ttl_seconds: int,
    ) -> None:
        self.catalog = catalog
        self.router = router
        self.billing = billing
        self.sessionmaker = sessionmaker
        self.lease_seconds = lease_seconds
        self.hold_ttl_seconds = hold_ttl_seconds
        self.tasks: dict[uuid.UUID, asyncio.Task[None]] = {}
        # The run number each of this process's runners holds (its fence).
        self.runs: dict[uuid.UUID, int] = {}

    # -- submit ----------------------------------------------------------------------

    async def submit(
        self,
        caller: Caller,
        *,
        model: Model,
        premise: str,
        title: str | None,
        chapters: int,
        words_per_chapter: int,
        temperature: float,
    ) -> uuid.UUID:
        story_id = uuid.uuid4()
        limits = [outline_words(chapters)] + [words_per_chapter] * chapters
        holds: list[tuple[str, int]] = []
        try:
            for n, words in enumerate(limits):
                amount = self.catalog.max_price_milli(model, words)
                hold_id = await self.billing.hold(
                    user_id=caller.user_id,
                    app=caller.app,
                    amount_milli=amount,
                    reference=f"story:{story_id}:{n}",
                    description=f"story {'outline' if n == 0 else f'chapter {n}'} "
                    f"with {model.id}, up to {words} words",
                    origin=caller.origin,
                    ttl_seconds=self.hold_ttl_seconds,
                )
                holds.append((hold_id, amount))
        except KuError as exc:
            await self._release_all(story_id, holds)
            if isinstance(exc, PaymentRequired):
                total = sum(self.catalog.max_price_milli(model, w) for w in limits)
                exc.detail.setdefault("story_max_cost_milli", total)
            raise
        except BaseException:  # e.g. the request cancelled between two holds
            await self._release_all(story_id, holds)
            raise
        try:
            await self._record(
                story_id, caller, model, premise, title, chapters, words_per_chapter,
                temperature, holds,
            )  # fmt: skip
        except BaseException:
            # Not recorded, so nothing would ever run or release them: back at once, not
            # after the story's hold TTL with the user's credit locked meanwhile.
            await self._release_all(story_id, holds)
            raise
        self.launch(story_id)
        return story_id

    async def _release_all(self, story_id: uuid.UUID, holds: list[tuple[str, int]]) -> None:
        for hold_id, _ in holds:
            try:
                await self.billing.release(hold_id)
            except KuError as exc:  # the hold's TTL is the last line
                log.warning("story %s: release of hold %s failed: %s", story_id, hold_id, exc)

    async def _record(
        self,
        story_id: uuid.UUID,
        caller: Caller,
        model: Model,
        premise: str,
        title: str | None,
        chapters: int,
        words_per_chapter: int,
        temperature: float,
        holds: list[tuple[str, int]],
    ) -> None:
        async with unit_of_work(self.sessionmaker) as session:
            session.add(
                Story(
                    id=story_id,
                    user_id=caller.user_id,
                    app=caller.app,
                    model=model.id,
                    premise=premise,
                    title=title,
                    chapters=chapters,
                    words_per_chapter=words_per_chapter,
                    temperature_milli=round(temperature * 1000),
                    status="running",
                    lease_until=datetime.now(UTC) + timedelta(seconds=self.lease_seconds),
                )
            )
            await session.flush()
            for n, (hold_id, amount) in enumerate(holds):
                session.add(
                    StoryPart(
                        story_id=story_id, n=n, hold_id=hold_id, held_milli=amount, status="held"
                    )
                )
            await emit(
                session,
                outbox,
                "story.started",
                {"user_id": caller.user_id, "story_id": str(story_id), "chapters": chapters},
            )

    # -- running ---------------------------------------------------------------------

    def launch(self, story_id: uuid.UUID, run: int = 1) -> None:
        """Run the story as its `run`-th runner (1 at submit; a takeover's claim numbers
        its own): every write of the runner is fenced by that number, so a runner that
        lost its lease (stalled past it, its renewals failing) writes nothing more."""
        if story_id in self.tasks:
            return
        task = asyncio.create_task(self.run(story_id, run), name=f"story-{story_id}")
        self.tasks[story_id] = task
        self.runs[story_id] = run

        def done(_: Any) -> None:
            self.tasks.pop(story_id, None)
            self.runs.pop(story_id, None)

        task.add_done_callback(done)

    async def run(self, story_id: uuid.UUID, run: int = 1) -> None:
        try:
            await self._run(story_id, run)
        except asyncio.CancelledError:
            raise  # shutting down: the lease runs out and a process resumes it
        except Exception:
            log.exception("story %s: runner failed; it will be resumed", story_id)

    async def _run(self, story_id: uuid.UUID, run: int) -> None:
        async with unit_of_work(self.sessionmaker) as session:
            story = await session.get(Story, story_id)
            parts = list(
                (
                    await session.scalars(
                        select(StoryPart)
                        .where(StoryPart.story_id == story_id)
                        .order_by(StoryPart.n)
                    )
                ).all()
            )
        if story is None or story.status != "running" or story.runs != run:
            return
        model = self.catalog.get(story.model)
        mine = self._fence(story_id, run)
        outline = parts[0].text or ""
        previous: str | None = None
        for part in parts:
            if part.status == "charged":
                if part.n == 0:
                    outline = part.text or ""
                previous = part.text if part.n else previous
                continue
            if part.status == "held":
                limit = outline_words(story.chapters) if part.n == 0 else story.words_per_chapter
                messages = (
                    outline_messages(story)
                    if part.n == 0
                    else chapter_messages(story, part.n, outline, previous)
                )
                try:
                    text_out, served = await self._generate(
                        model, messages, limit, story.temperature_milli / 1000
                    )
                except (KuError, ProviderError) as exc:
                    await self._fail(story, run, part.n, str(getattr(exc, "code", exc)))
                    return
                served_model = served.model if served else model
                part.text = text_out
                part.words = count_words(text_out)
                part.cost_milli = served_model.price_milli(part.words)
                part.served_model = served_model.id
                part.provider = served.provider if served else None
                async with unit_of_work(self.sessionmaker) as session:
                    written = await session.execute(
                        update(StoryPart)
                        .where(StoryPart.story_id == story_id, StoryPart.n == part.n, mine)
                        .values(
                            status="generated",
                            text=part.text,
                            words=part.words,
                            cost_milli=part.cost_milli,
                            served_model=part.served_model,
                            provider=part.provider,
                            updated_at=datetime.now(UTC),
                        )
                    )
                if not _rowcount(written):
                    return self._lost(story_id, run)
            # generated: charge it (a resumed runner lands here for a part done before the crash)
            try:
                captured = await self.billing.settle(part.hold_id, part.cost_milli)
            except UNREACHABLE as exc:
                # The ledger could not be reached (after the client's retries): the part
                # stays `generated` and the runner ends; once its lease runs out, a runner
                # resumes here and captures it (idempotent by hold id). Failing the story
                # would release a hold whose text the user already has.
                log.warning(
                    "story %s part %s: capture deferred, the ledger is unreachable: %s",
                    story_id,
                    part.n,
                    exc.code,
                )
                return
            except KuError as exc:
                await self._fail(story, run, part.n, f"charge failed: {exc.code}")
                return
            if captured != part.cost_milli:
                # A clawback shrank the part's hold: it is charged what was left in it.
                log.error(
                    "story %s part %s: charged %s of its cost %s (its hold was clawed back)",
                    story_id,
                    part.n,
                    captured,
                    part.cost_milli,
                )
                part.cost_milli = captured
            async with unit_of_work(self.sessionmaker) as session:
                charged = await session.execute(
                    update(StoryPart)
                    .where(
                        StoryPart.story_id == story_id,
                        StoryPart.n == part.n,
                        StoryPart.status == "generated",
                        mine,
                    )
                    .values(
                        status="charged", cost_milli=part.cost_milli, updated_at=datetime.now(UTC)
                    )
                )
                if not _rowcount(charged):
                    # Captured (the ledger replays it for whoever takes over), not recorded.
                    return self._lost(story_id, run)
                session.add(
                    Generation(
                        id=uuid.uuid5(story_id, str(part.n)),
                        user_id=story.user_id,
                        app=story.app,
                        kind="story:outline" if part.n == 0 else "story:chapter",
                        model=story.model,
                        served_model=part.served_model,
                        provider=part.provider,
                        prompt=story.premise,
                        output=part.text,
                        max_words=story.words_per_chapter,
                        words=part.words,
                        held_milli=part.held_milli,
                        cost_milli=part.cost_milli,
                        hold_id=part.hold_id,
                        status="completed",
                        finished_at=datetime.now(UTC),
                    )
                )
                await emit(
                    session,
                    outbox,
                    "story.progress",
                    {
                        "user_id": story.user_id,
                        "story_id": str(story_id),
                        "part": part.n,
                        "kind": "outline" if part.n == 0 else "chapter",
                        "chapter": part.n,
                        "chapters": story.chapters,
                        "words": part.words,
                        "cost_milli": part.cost_milli,
                    },
                )
            part.status = "charged"
            if part.n == 0:
                outline = part.text or ""
            else:
                previous = part.text
        async with unit_of_work(self.sessionmaker) as session:
            completed = await session.execute(
                update(Story)
                .where(Story.id == story_id, Story.runs == run, Story.status == "running")
                .values(status="completed", finished_at=datetime.now(UTC))
            )
            if not _rowcount(completed):
                return self._lost(story_id, run)
            await emit(
                session,
                outbox,
                "story.completed",
                {
                    "user_id": story.user_id,
                    "story_id": str(story_id),
                    "chapters": story.chapters,
                    "cost_milli": sum(p.cost_milli for p in parts),
                },
            )

    async def _generate(
        self, model: Model, messages: list[Message], limit: int, temperature: float
    ) -> tuple[str, Served | None]:
        served: list[Served] = []
        cutter = _Cutter(limit)
        out: list[str] = []
        async for delta in self.router.stream(
            model, messages, max_words=limit, temperature=temperature, served=served
        ):
            piece = cutter.take(delta)
            if piece:
                out.append(piece)
            if cutter.full:
                break
        return "".join(out), (served[0] if served else None)

    async def _fail(self, story: Story, run: int, at: int, reason: str) -> None:
        """Fail the story at part `at`: decided by the fenced update of the story (a
        runner that lost its lease decides nothing), then that part's hold and every
        later one not charged are released."""
        async with unit_of_work(self.sessionmaker) as session:
            failed = await session.execute(
                update(Story)
                .where(Story.id == story.id, Story.runs == run, Story.status == "running")
                .values(status="failed", error=reason, finished_at=datetime.now(UTC))
            )
            if not _rowcount(failed):
                return self._lost(story.id, run)
            await emit(
                session,
                outbox,
                "story.failed",
                {"user_id": story.user_id, "story_id": str(story.id), "part": at, "reason": reason},
            )
            open_parts = (
                await session.scalars(
                    select(StoryPart).where(
                        StoryPart.story_id == story.id,
                        StoryPart.n >= at,
                        StoryPart.status.in_(("held", "generated")),
                    )
                )
            ).all()
        for part in open_parts:
            try:
                await self.billing.release(part.hold_id)
            except KuError as exc:
                log.warning("story %s part %s: release failed: %s", story.id, part.n, exc)
        async with unit_of_work(self.sessionmaker) as session:
            await session.execute(
                update(StoryPart)
                .where(
                    StoryPart.story_id == story.id,
                    StoryPart.n >= at,
                    StoryPart.status.in_(("held", "generated")),
                )
                .values(status="released", updated_at=datetime.now(UTC))
            )

    @staticmethod
    def _fence(story_id: uuid.UUID, run: int) -> Any:
        """A condition true only while the story is running under this runner's number."""
        return exists().where(Story.id == story_id, Story.runs == run, Story.status == "running")

    @staticmethod
    def _lost(story_id: uuid.UUID, run: int) -> None:
        log.warning("story %s: runner %s lost its lease; another one has it", story_id, run)

    # -- leases ----------------------------------------------------------------------

    async def renew_and_claim(self) -> None:
        """Extend the leases of the stories this process runs; take over one whose
        runner is gone."""
        lease = float(self.lease_seconds)
        async with unit_of_work(self.sessionmaker) as session:
            if self.tasks:
                await session.execute(
                    text(
                        "UPDATE generation.stories"
                        " SET lease_until = now() + make_interval(secs => :lease)"
                        " WHERE status = 'running' AND (id, runs) IN"
                        " (SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:runs AS int[])))"
                    ),
                    {
                        "lease": lease,
                        "ids": list(self.runs),
                        "runs": list(self.runs.values()),
                    },
                )
            claimed = (
                await session.execute(
                    text(
                        "UPDATE generation.stories"
                        " SET lease_until = now() + make_interval(secs => :lease),"
                        " runs = runs + 1"
                        " WHERE id IN (SELECT id FROM generation.stories"
                        " WHERE status = 'running' AND lease_until < now()"
                        " AND NOT (id = ANY(:mine))"
                        " ORDER BY lease_until LIMIT 5 FOR UPDATE SKIP LOCKED)"
                        " RETURNING id, runs"
                    ),
                    {"lease": lease, "mine": list(self.tasks)},
                )
            ).all()
        for story_id, run in claimed:
            log.info("story %s: resuming (its runner's lease ran out)", story_id)
            self.launch(story_id, run)

    async def stop(self) -> None:
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=3)

    def view(self, story: Story, parts: list[StoryPart]) -> dict[str, Any]:
        return {
            "id": str(story.id),
            "status": story.status,
            "title": story.title,
            "premise": story.premise,
            "model": story.model,
            "chapters": story.chapters,
            "words_per_chapter": story.words_per_chapter,
            "runs": story.runs,
            "error": story.error,
            "cost": sum(p.cost_milli for p in parts if p.status == "charged"),
            "held": sum(p.held_milli for p in parts if p.status in ("held", "generated")),
            "parts": [
                {
                    "n": p.n,
                    "kind": "outline" if p.n == 0 else "chapter",
                    "status": p.status,
                    "text": p.text,
                    "words": p.words,
                    "cost": p.cost_milli,
                    "served_model": p.served_model,
                    "provider": p.provider,
                }
                for p in parts
            ],
            "project_code": story.project_code,
            "created_at": story.created_at,
        }


class StoryLeases(BackgroundLoop):
    task_name = "story-leases"

    def __init__(self, stories: Stories) -> None:
        super().__init__()
        self.stories = stories
        self.interval = max(0.2, min(5.0, stories.lease_seconds / 3))

    async def run(self) -> None:
        while not self.stopping:
            try:
                await self.stories.renew_and_claim()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("story leases: %s", exc)
            await asyncio.sleep(self.interval)


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)
